"""The report's plots as inline SVG, and the text helpers the page shares with them.

No scripts and no external files: the page must open offline, as a mail attachment.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MAX_TEXT_CHARS = 600  # a runaway caption must not blow up the page
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
ACCENT = "#3b6fd0"


@dataclass(frozen=True)
class Histogram:
    edges: list[int]  # bin i holds values in [edges[i], edges[i + 1])
    counts: list[int]


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def short_text(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def display_text(value: Any, limit: int = MAX_TEXT_CHARS) -> str:
    """Model text as shown: control characters (a random model emits them) become U+FFFD, length is capped."""
    return short_text(CONTROL_CHARS.sub("\ufffd", str(value)), limit)


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _svg(width: int, height: int, body: Iterable[str], label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{escape(label)}">' + "".join(body) + "</svg>"
    )


def svg_bars(items: list[tuple[str, int, str]], label: str, label_width: int = 130, width: int = 460) -> str:
    """Horizontal bars, one per (label, value, colour): long labels stay readable."""
    row, pad = 22, 6
    top = max((v for _, v, _ in items), default=0) or 1
    span = width - label_width - 64
    body = []
    for index, (name, value, colour) in enumerate(items):
        y = pad + index * row
        length = max(1, round(span * value / top)) if value else 0
        chars = max(4, label_width // 7)
        full = escape(display_text(name))
        body.append(
            f'<text x="{label_width - 6}" y="{y + 15}" text-anchor="end">{escape(display_text(name, chars))}'
            f"<title>{full}</title></text>"
            f'<rect x="{label_width}" y="{y + 3}" width="{length}" height="{row - 6}" fill="{colour}">'
            f"<title>{full}: {value:,}</title></rect>"
            f'<text x="{label_width + length + 4}" y="{y + 15}">{value:,}</text>'
        )
    return _svg(width, pad * 2 + row * len(items), body, label)


def _frame(width: int, height: int, xlabel: str, ylabel: str) -> tuple[int, int, int, int, list[str]]:
    left, right, top, bottom = 52, 12, 10, 38
    body = [
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" class="axis"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" class="axis"/>',
        f'<text x="{(left + width - right) / 2}" y="{height - 4}" text-anchor="middle">{escape(xlabel)}</text>',
        f'<text x="12" y="{(top + height - bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {(top + height - bottom) / 2})">{escape(ylabel)}</text>',
    ]
    return left, width - left - right, top, height - top - bottom, body


def svg_histogram(hist: Histogram, xlabel: str, width: int = 460, height: int = 200) -> str:
    left, plot_w, top, plot_h, body = _frame(width, height, xlabel, "rows")
    peak = max(hist.counts) or 1
    step = plot_w / len(hist.counts)
    for index, count in enumerate(hist.counts):
        bar = plot_h * count / peak
        low, high = hist.edges[index], hist.edges[index + 1] - 1
        span = f"{low:,}" if low == high else f"{low:,}–{high:,}"
        body.append(
            f'<rect x="{left + index * step + 0.5:.1f}" y="{top + plot_h - bar:.1f}" width="{max(step - 1, 1):.1f}" '
            f'height="{bar:.1f}" fill="{ACCENT}"><title>{span}: {count:,} rows</title></rect>'
        )
    _axis_ends(body, left, plot_w, top, plot_h, f"{hist.edges[0]:,}", f"{hist.edges[-1] - 1:,}", f"{peak:,}")
    return _svg(width, height, body, f"histogram of {xlabel}")


def _axis_ends(
    body: list[str], left: float, plot_w: float, top: float, plot_h: float, x_low: str, x_high: str, y_top: str
) -> None:
    """Label both ends of each axis; the y axis starts at 0."""
    baseline = top + plot_h
    body.append(f'<text x="{left}" y="{baseline + 14}" text-anchor="start">{x_low}</text>')
    body.append(f'<text x="{left + plot_w}" y="{baseline + 14}" text-anchor="end">{x_high}</text>')
    body.append(f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{y_top}</text>')
    body.append(f'<text x="{left - 4}" y="{baseline}" text-anchor="end">0</text>')


def svg_line(points: list[tuple[float, int]], xlabel: str, ylabel: str, width: int = 460, height: int = 200) -> str:
    left, plot_w, top, plot_h, body = _frame(width, height, xlabel, ylabel)
    x_top = max(x for x, _ in points) or 1.0
    y_top = max(y for _, y in points) or 1
    coords = [(left + plot_w * x / x_top, top + plot_h - plot_h * y / y_top) for x, y in points]
    body.append(
        f'<polyline fill="none" stroke="{ACCENT}" stroke-width="2" points="'
        + " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        + '"/>'
    )
    for (x, y), (seconds, rows) in zip(coords, points, strict=True):
        body.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{ACCENT}">'
            f"<title>{rows:,} rows after {seconds:,.1f} s</title></circle>"
        )
    _axis_ends(body, left, plot_w, top, plot_h, "0", _fmt(x_top), f"{y_top:,}")
    return _svg(width, height, body, f"{ylabel} over {xlabel}")
