"""The HTML report of a run: summary, plots and a contact sheet of thumbnails, in one self-contained file.

People judge a run by looking at it: are the captions any good, what failed and why, how fast did it go.
Everything the page needs is inside it (inline CSS, JS and SVG, thumbnails as base64 JPEG), so it opens
offline and can be attached to a ticket. Counts come from the shards' stats (kept in their indexes), so a
partial run with no summary gets a report too, and neither the time to build the page nor its size grows
with the rows of the output, only with its shards and the sample.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from qwenbatch import schema, storage
from qwenbatch.config import JobConfig
from qwenbatch.load import fetch_bytes, open_checked, to_rgb
from qwenbatch.locations import LoadLimits
from qwenbatch.pipeline import limits_for
from qwenbatch.rows import error_message
from qwenbatch.shards import NO_STATUS, Shard, list_shards, merge_stats, read_stats
from qwenbatch.status import FAILED, RUNNING, SUCCEEDED, read_status

DEFAULT_SAMPLE = 200  # ok rows on the contact sheet
DEFAULT_FAILED = 100  # failed rows on the contact sheet
THUMB_PX = 160
THUMB_QUALITY = 70
REPORT_FETCH_TIMEOUT_S = 10.0
REPORT_FETCH_RETRIES = 1
THUMB_WORKERS = 8  # reading images is I/O bound on object stores; decoding releases the GIL
MAX_TEXT_CHARS = 600  # a runaway caption must not blow up the page
TOP_REASONS = 12
HISTOGRAM_BINS = 20
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
SAMPLE_POOL = 4  # the contact sheet draws from shards holding this many times its sample, at least

STATUS_COLOURS = {
    schema.OK: "#3a9d5d",
    schema.LOAD_ERROR: "#e08a1e",
    schema.PROMPT_ERROR: "#8e5bc2",
    schema.INFER_ERROR: "#d2453a",
}
OTHER_COLOUR = "#8a8f98"
ACCENT = "#3b6fd0"


@dataclass(frozen=True)
class Columns:
    """Output column names that the job's config may rename."""

    id: str = schema.ID
    image: str = schema.IMAGE
    question: str = schema.QUESTION
    prompt: str = schema.PROMPT

    @classmethod
    def from_summary(cls, summary: dict[str, Any] | None) -> Columns:
        config = (summary or {}).get("config") or {}
        source, task = config.get("input") or {}, config.get("task") or {}
        return cls(
            id=source.get("id_column", schema.ID),
            image=source.get("image_column", schema.IMAGE),
            question=task.get("question_column", schema.QUESTION),
            prompt=task.get("prompt_column", schema.PROMPT),
        )


@dataclass(frozen=True)
class Histogram:
    edges: list[int]  # bin i holds values in [edges[i], edges[i + 1])
    counts: list[int]


@dataclass(frozen=True)
class Card:
    row: dict[str, Any]
    thumbnail: str | None  # a data URI, or None with `why`
    why: str | None


@dataclass
class Facts:
    """Everything the page shows, gathered from the output before any HTML is written."""

    output: str
    state: str  # as `qwenbatch status` decides it
    summary: dict[str, Any] | None
    columns: Columns
    task: str | None
    model: str | None
    rows: int
    status: dict[str, int]
    finish: dict[str, int]
    input_tokens: int
    output_tokens: int
    reasons: list[tuple[str, int, str]]  # (reason, rows, one full message)
    output_hist: Histogram | None
    image_hist: Histogram | None
    runs: list[dict[str, Any]]
    timeline_run: str | None
    timeline: list[tuple[float, int]]  # (seconds since `timeline_since`, rows written so far)
    timeline_since: str  # the run's start when the summary gives it, else its first shard
    cards: list[Card]
    busy: dict[str, Any] | None = None  # `gpu_busy` and `replicas`: the finished run's, or the running one's

    @property
    def failed(self) -> int:
        return self.rows - self.status.get(schema.OK, 0)


# --- gathering ------------------------------------------------------------------------------------


def _ordered_status(counts: dict[str, int]) -> dict[str, int]:
    known = [s for s in schema.STATUSES if s in counts]
    return {s: counts[s] for s in known + sorted(set(counts) - set(known))}


def error_reasons(counts: dict[str, int], examples: dict[str, str], top: int) -> list[tuple[str, int, str]]:
    """The most common reasons (`shards.error_reason`: messages that differ only in a path or a number
    are one reason), each with its rows and one full message."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]
    return [(reason, count, examples.get(reason, reason)) for reason, count in ranked]


def histogram(counts: dict[str, int], bins: int = HISTOGRAM_BINS) -> Histogram | None:
    """Integer-aligned bins over value -> rows counts: token counts are whole numbers."""
    if not counts:
        return None
    values = np.array([int(value) for value in counts], np.int64)
    low, high = int(values.min()), int(values.max())
    width = max(1, -(-(high - low + 1) // bins))
    binned = np.bincount((values - low) // width, weights=np.array(list(counts.values()), np.float64))
    edges = [low + i * width for i in range(len(binned))] + [high + 1]  # the last bin ends at the maximum
    return Histogram(edges=edges, counts=[int(n) for n in binned])


def _started(summary: dict[str, Any] | None) -> float | None:
    try:
        return datetime.fromisoformat(summary["started"]).timestamp() if summary else None
    except (KeyError, TypeError, ValueError):
        return None


def shard_runs(
    shards: list[Shard], stats: list[dict[str, Any]], summary: dict[str, Any] | None
) -> tuple[list[dict[str, Any]], str | None, list[tuple[float, int]], str]:
    """The runs that wrote this output, and rows written over time in the summary's (or the latest) run."""
    runs: dict[str, dict[str, Any]] = {}
    for shard, item in zip(shards, stats, strict=True):
        for run_id, rows in item.get("runs", {}).items():
            run = runs.setdefault(run_id, {"run_id": run_id, "rows": 0, "shards": []})
            run["rows"] += rows
            run["shards"].append((shard.mtime, rows))
    if not runs:
        return [], None, [], ""
    for run in runs.values():
        times = [t for t, _ in run["shards"] if t is not None]
        run["first"], run["last"] = (min(times), max(times)) if times else (None, None)
    ordered = sorted(runs.values(), key=lambda r: (r["last"] is None, r["last"] or 0))
    wanted = (summary or {}).get("run_id")
    chosen = runs.get(wanted) if wanted in runs else (ordered[-1] if ordered[-1]["last"] is not None else None)
    if chosen is None:
        return ordered, None, [], ""
    written_at = sorted((t, n) for t, n in chosen["shards"] if t is not None)
    start = _started(summary) if chosen["run_id"] == wanted else None
    origin = start if start is not None else written_at[0][0]
    timeline = [(0.0, 0)] if start is not None else []
    written = 0
    for when, count in written_at:
        written += count
        timeline.append((max(0.0, when - origin), written))
    return ordered, chosen["run_id"], timeline, "the run started" if start is not None else "its first shard"


def image_limits(summary: dict[str, Any] | None) -> LoadLimits:
    """The job's own limits and store settings for reading its images again, on a short leash:
    a report must not hang for minutes on a slow store. Defaults when the config is unknown or unreadable."""
    config = (summary or {}).get("config")
    try:
        limits = limits_for(JobConfig.model_validate(config)) if config else None
    except (ValueError, OSError):  # a config from another version of qwenbatch, or a store that is gone
        limits = None
    if limits is None:
        limits = LoadLimits(
            min_pixels=schema.DEFAULT_MIN_PIXELS,
            max_pixels=schema.DEFAULT_MAX_PIXELS,
            allowed_prefixes=(),
            storage=storage.active(),
        )
    return replace(
        limits,
        fetch_timeout_s=min(limits.fetch_timeout_s, REPORT_FETCH_TIMEOUT_S),
        fetch_retries=min(limits.fetch_retries, REPORT_FETCH_RETRIES),
    )


def thumbnail(location: str | None, limits: LoadLimits, size: int = THUMB_PX) -> tuple[str | None, str | None]:
    """(a JPEG data URI, None), or (None, why not): a bad image is a placeholder, never a failed report.

    Only images the job itself read come here, so the job's prefix check has already passed on them.
    """
    if not location:
        return None, "no image location in the row"
    try:
        image = open_checked(fetch_bytes(location, limits), limits)
        image.draft("RGB", (size, size))  # JPEG decodes at 1/2..1/8 scale: big photos stay cheap
        image = to_rgb(image)
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=THUMB_QUALITY, optimize=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable image becomes a placeholder with its reason
        return None, error_message(exc)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), None


def _sample(mask: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    candidates = np.flatnonzero(mask)
    if len(candidates) <= size:
        return candidates
    return np.sort(rng.choice(candidates, size=size, replace=False))


def _pick_shards(counts: list[int], wanted: int, rng: np.random.Generator) -> set[int]:
    """Shards drawn at random, weighted by their rows of a kind, until they hold `wanted` such rows
    (every shard with such rows when they hold fewer)."""
    weights = np.array(counts, np.float64)
    present = int((weights > 0).sum())
    if not present:
        return set()
    order = rng.choice(len(counts), size=present, replace=False, p=weights / weights.sum())
    held = np.cumsum(weights[order])
    return set(order[: int(np.searchsorted(held, wanted)) + 1].tolist())


def sample_cards(
    fs: Any,
    shards: list[Shard],
    stats: list[dict[str, Any]],
    columns: Columns,
    limits: LoadLimits,
    ok: int,
    failed: int,
    seed: int,
) -> list[Card]:
    """A seeded sample of ok rows and failed rows. A few shards are drawn (weighted by their ok or failed
    rows, until they hold SAMPLE_POOL times the sample) and the sample is drawn from their rows, read by
    index: a large output's report reads a few shards' statuses and the sampled rows, no more."""
    rng = np.random.default_rng(seed)
    oks = [item["status"].get(schema.OK, 0) for item in stats]
    chosen = _pick_shards(oks, SAMPLE_POOL * ok, rng) if ok else set()
    if failed:
        chosen |= _pick_shards(
            [item["rows"] - n for item, n in zip(stats, oks, strict=True)], SAMPLE_POOL * failed, rng
        )
    if not chosen:
        return []
    dataset = pads.dataset([shards[i].path for i in sorted(chosen)], filesystem=fs, format="parquet")
    status = dataset.to_table(columns=[schema.STATUS]).column(schema.STATUS)
    is_failed = pc.fill_null(pc.not_equal(status, schema.OK), True).to_numpy(zero_copy_only=False)
    indices = np.concatenate([_sample(~is_failed, ok, rng), _sample(is_failed, failed, rng)])
    if not len(indices):
        return []
    wanted = [
        columns.id,
        columns.image,
        columns.question,
        columns.prompt,
        schema.TEXT,
        schema.REASONING,
        schema.STATUS,
        schema.ERROR,
        schema.WIDTH,
        schema.HEIGHT,
        schema.IMAGE_TOKENS,
        schema.OUTPUT_TOKENS,
        schema.FINISH_REASON,
    ]
    names = dataset.schema.names
    present = list(dict.fromkeys(c for c in wanted if c in names))
    rows = dataset.take(pa.array(indices, pa.int64()), columns=present).to_pylist()
    # A row the job could not load is not read again: its card says why, and a dead store costs nothing.
    readable = [r for r in rows if r.get(schema.STATUS) != schema.LOAD_ERROR]
    locations = sorted({str(r[columns.image]) for r in readable if r.get(columns.image)})
    with ThreadPoolExecutor(THUMB_WORKERS) as pool:
        thumbs = dict(zip(locations, pool.map(lambda loc: thumbnail(loc, limits), locations), strict=True))
    cards = []
    for row in rows:
        location = row.get(columns.image)
        if row.get(schema.STATUS) == schema.LOAD_ERROR:
            uri, why = None, "the job could not load this image"
        else:
            uri, why = thumbs[str(location)] if location else thumbnail(None, limits)
        cards.append(Card(row=row, thumbnail=uri, why=why))
    return cards


def gather(output: str, sample: int = DEFAULT_SAMPLE, failed: int = DEFAULT_FAILED, seed: int = 0) -> Facts:
    """Counts and plots from the shards' stats (their indexes), and the contact sheet from a few shards."""
    fs, base = storage.resolve(output)
    shards = list_shards(fs, base)
    status_now = read_status(output)  # raises NoRunError when no run has written there
    summary = status_now.summary
    columns = Columns.from_summary(summary)
    config = (summary or {}).get("config") or {}
    stats = read_stats(fs, shards, columns.id)
    totals = merge_stats(stats)
    runs, timeline_run, timeline, timeline_since = shard_runs(shards, stats, summary)
    return Facts(
        output=output,
        state=status_now.state,
        summary=summary,
        columns=columns,
        task=(config.get("task") or {}).get("kind") or ", ".join(sorted(totals["tasks"])) or None,
        model=(config.get("model") or {}).get("name") or ", ".join(sorted(totals["models"])) or None,
        rows=totals["rows"],
        status=_ordered_status(totals["status"]),
        finish=totals["finish"],
        input_tokens=totals["input_tokens"],
        output_tokens=totals["output_tokens"],
        reasons=error_reasons(totals["reasons_count"], totals["reasons_example"], TOP_REASONS),
        output_hist=histogram(totals["output_tokens_hist"]),
        image_hist=histogram(totals["image_tokens_hist"]),
        runs=runs,
        timeline_run=timeline_run,
        timeline=timeline,
        timeline_since=timeline_since,
        cards=sample_cards(fs, shards, stats, columns, image_limits(summary), sample, failed, seed),
        busy=status_now.busy,
    )


# --- SVG plots ------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def display_text(value: Any, limit: int = MAX_TEXT_CHARS) -> str:
    """Model text as shown: control characters (a random model emits them) become U+FFFD, length is capped."""
    return _short(CONTROL_CHARS.sub("\ufffd", str(value)), limit)


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _svg(width: int, height: int, body: Iterable[str], label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{_e(label)}">' + "".join(body) + "</svg>"
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
        full = _e(display_text(name))
        body.append(
            f'<text x="{label_width - 6}" y="{y + 15}" text-anchor="end">{_e(display_text(name, chars))}'
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
        f'<text x="{(left + width - right) / 2}" y="{height - 4}" text-anchor="middle">{_e(xlabel)}</text>',
        f'<text x="12" y="{(top + height - bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {(top + height - bottom) / 2})">{_e(ylabel)}</text>',
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


# --- HTML -----------------------------------------------------------------------------------------


CSS = """
:root{--ok:#3a9d5d;--bad:#d2453a;--muted:#6b7280;--line:#e3e5e8}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1f2328;background:#f6f7f9}
header{background:#1f2a44;color:#fff;padding:16px 24px}
header h1{margin:0;font-size:20px}
header .where{color:#c8d0e0;font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
main{padding:16px 24px;max-width:1400px;margin:auto}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 18px;margin:0 0 16px}
h2{font-size:16px;margin:0 0 10px}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;color:#fff;font-size:12px;font-weight:600}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.tile{border:1px solid var(--line);border-radius:6px;padding:8px 10px}
.tile .label{color:var(--muted);font-size:12px}
.tile .value{font-size:20px;font-weight:600}
.tile .unit{font-size:13px;font-weight:400;color:var(--muted)}
table{border-collapse:collapse;font-size:13px}
td,th{border-bottom:1px solid var(--line);padding:4px 10px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.cols{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(470px,1fr));gap:14px}
.plots figure{margin:0}
figcaption{font-weight:600;margin-bottom:4px}
svg{font:11px system-ui,sans-serif;fill:#1f2328;max-width:100%;height:auto}
svg .axis{stroke:#9aa0a6}
.note{color:var(--muted);font-size:12px}
.warn{background:#fff4e5;border:1px solid #f0c36d;border-radius:6px;padding:8px 12px;margin-bottom:10px}
pre{background:#f6f8fa;padding:10px;border-radius:6px;overflow:auto;font-size:12px}
#filters button{border:1px solid var(--line);background:#fff;border-radius:14px;padding:3px 12px;margin:0 6px 6px 0;
cursor:pointer;font:inherit}
#filters button.on{background:#1f2a44;color:#fff;border-color:#1f2a44}
#sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:12px;margin-top:8px}
.card{border:1px solid var(--line);border-radius:8px;padding:8px;display:flex;flex-direction:column;gap:4px;
background:#fff;overflow-wrap:anywhere}
.card[hidden]{display:none}
.card.failed{border-color:#f0b4ae;background:#fff8f7}
.card .frame{height:164px;display:flex;align-items:center;justify-content:center;background:#eef0f3;border-radius:4px}
.card img{max-width:100%;max-height:160px}
.ph{color:var(--muted);font-size:12px;text-align:center;padding:8px}
.card .id{font-family:ui-monospace,monospace;font-size:12px}
.card .text{white-space:pre-wrap}
.card .q{color:#1f4ea8}
.card .err{color:var(--bad);font-family:ui-monospace,monospace;font-size:12px}
.card .meta{color:var(--muted);font-size:11px}
"""

SCRIPT = """
(function () {
  const buttons = document.querySelectorAll('#filters button');
  const cards = document.querySelectorAll('#sheet .card');
  const shown = document.getElementById('shown');
  buttons.forEach(function (button) {
    button.addEventListener('click', function () {
      const wanted = button.dataset.filter;
      let visible = 0;
      cards.forEach(function (card) {
        const match = wanted === 'all' || (wanted === 'failed' ? card.dataset.failed === '1'
                                                                : card.dataset.status === wanted);
        card.hidden = !match;
        if (match) visible += 1;
      });
      buttons.forEach(function (other) { other.classList.toggle('on', other === button); });
      shown.textContent = String(visible);
    });
  });
})();
"""


def _colour(status: str) -> str:
    return STATUS_COLOURS.get(status, OTHER_COLOUR)


def _num(key: str | None, value: Any) -> str:
    """A number as shown, carrying its summary path in data-key so a reader (or a test) can check it."""
    if value is None:
        return '<span class="num">—</span>'
    attr = f' data-key="{_e(key)}"' if key else ""
    text = f"{value:,}" if isinstance(value, int | float) and not isinstance(value, bool) else str(value)
    return f'<span class="num"{attr}>{_e(text)}</span>'


def _tile(label: str, key: str | None, value: Any, unit: str = "") -> str:
    suffix = f' <span class="unit">{_e(unit)}</span>' if unit and value is not None else ""
    value_html = f'<div class="value">{_num(key, value)}{suffix}</div>'
    return f'<div class="tile"><div class="label">{_e(label)}</div>{value_html}</div>'


def _when(seconds: float | None) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if seconds is not None else "—"


def _summary_section(facts: Facts) -> str:
    summary = facts.summary or {}
    this_run = summary.get("this_run") or {}
    state = facts.state
    parts = ["<section id='summary'><h2>Run summary</h2>"]
    if not facts.summary:
        parts.append(
            f"<div class='warn'>No {_e(schema.SUMMARY_FILE)}: the run is still going or stopped early. "
            "Every count below comes from the shards written so far.</div>"
        )
    elif (summary.get("output") or {}).get("rows") != facts.rows:
        parts.append(
            f"<div class='warn'>The shards hold {facts.rows:,} rows; {_e(schema.SUMMARY_FILE)} counted "
            f"{(summary.get('output') or {}).get('rows', 0):,}. A later run wrote rows without finishing. "
            "Counts below come from the shards.</div>"
        )
    colour = {SUCCEEDED: STATUS_COLOURS[schema.OK], FAILED: STATUS_COLOURS[schema.INFER_ERROR]}.get(state, "#c77700")
    error_rate = round(facts.failed / facts.rows, 6) if facts.rows else 0.0
    parts.append(
        f"<p><span class='badge' style='background:{colour}' id='state'>{_e(state)}</span> "
        f"run {_num('run_id' if facts.summary else None, summary.get('run_id'))} · "
        f"task <b>{_e(facts.task or '—')}</b> · model <code>{_e(facts.model or '—')}</code> · "
        f"started {_num('started' if facts.summary else None, summary.get('started'))}</p><div class='tiles'>"
    )
    tiles = [
        _tile("rows in the output", "output.rows", facts.rows),
        *(_tile(f"status {s}", f"output.status.{s}", n) for s, n in facts.status.items()),
        _tile("error rate", "error_rate", error_rate),
        _tile("input tokens", "output.input_tokens", facts.input_tokens),
        _tile("output tokens", "output.output_tokens", facts.output_tokens),
    ]
    if facts.summary:
        tiles += [
            _tile("manifest rows", "manifest_rows", summary.get("manifest_rows")),
            _tile("already done before", "skipped_done", summary.get("skipped_done")),
            _tile("this run: rows", "this_run.rows", this_run.get("rows")),
            _tile("this run: duration", "duration_s", summary.get("duration_s"), "s"),
            _tile("this run: throughput", "this_run.images_per_s", this_run.get("images_per_s"), "images/s"),
            _tile(
                "this run: generation",
                "this_run.output_tokens_per_s",
                this_run.get("output_tokens_per_s"),
                "tokens/s",
            ),
            _tile("this run: shards", "this_run.shards", this_run.get("shards")),
        ]
    parts += tiles
    parts.append("</div><div class='cols'>")
    if facts.finish:
        rows = "".join(f"<tr><td>{_e(k)}</td><td class='n'>{v:,}</td></tr>" for k, v in sorted(facts.finish.items()))
        parts.append(f"<div><h3>Finish reasons</h3><table>{rows}</table></div>")
    if facts.runs:
        rows = "".join(
            f"<tr><td><code>{_e(r['run_id'])}</code></td><td class='n'>{r['rows']:,}</td>"
            f"<td class='n'>{len(r['shards']):,}</td><td>{_when(r['first'])}</td><td>{_when(r['last'])}</td></tr>"
            for r in facts.runs
        )
        parts.append(
            "<div><h3>Runs that wrote this output</h3><table><tr><th>run</th><th>rows</th><th>shards</th>"
            f"<th>first shard</th><th>last shard</th></tr>{rows}</table></div>"
        )
    parts.append("</div>")
    if facts.busy:
        parts.append(_busy_block(facts.busy, live=facts.state == RUNNING))
    if facts.summary:
        config = json.dumps(summary.get("config") or {}, indent=2)
        versions = "".join(
            f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in (summary.get("versions") or {}).items()
        )
        parts.append(
            f"<details><summary>Config</summary><pre>{_e(config)}</pre></details>"
            f"<details><summary>Versions</summary><table>{versions}</table></details>"
        )
    parts.append("</section>")
    return "".join(parts)


def _percent(share: float | None) -> str:
    return "—" if share is None else f"{share:.1%}"


def _busy_block(busy: dict[str, Any], live: bool) -> str:
    """How busy the replicas kept their GPUs: under 95% they waited on the CPU side, so add CPUs."""
    figures = busy.get("replicas") or {}
    share = busy.get("gpu_busy")
    key = None if live else "gpu_busy"  # a running run's figures are not in the summary yet
    rows = "".join(
        f"<tr><td><code>{_e(r['replica'])}</code></td><td>{_e(r['device'])}</td>"
        f"<td class='n'>{_percent(r['busy'])}</td>"
        f"<td class='n'>{r['generate_s']:,.1f}</td><td class='n'>{r['prepare_s']:,.1f}</td>"
        f"<td class='n'>{r['wait_s']:,.1f}</td><td class='n'>{r['batches']:,}</td><td class='n'>{r['rows']:,}</td></tr>"
        for r in figures.get("each", [])
    )
    return (
        f"<div id='busy'><h3>GPU busy{' (running)' if live else ''}: {_percent(share)}</h3>"
        f"<p>Time in <code>generate</code> over {figures.get('count', 0)} replica(s) x "
        f"{figures.get('window_s', 0):,.1f} s from the first <code>generate</code> to the last: {_num(key, share)}. "
        "Under 95%, the GPUs waited for rows or for batches to be prepared: add CPUs per GPU.</p>"
        "<table><tr><th>replica</th><th>device</th><th>busy</th><th>generate (s)</th><th>preparing (s)</th>"
        f"<th>waiting for rows (s)</th><th>batches</th><th>rows</th></tr>{rows}</table></div>"
    )


def _plots_section(facts: Facts) -> str:
    figures = []
    if facts.status:
        bars = [(s, n, _colour(s)) for s, n in facts.status.items()]
        figures.append(("Rows by status", svg_bars(bars, "rows by status")))
    if facts.output_hist:
        figures.append(("Output tokens per row", svg_histogram(facts.output_hist, "output tokens")))
    if facts.image_hist:
        figures.append(("Image tokens per row (what the model saw)", svg_histogram(facts.image_hist, "image tokens")))
    if len(facts.timeline) >= 2:
        seconds, rows = facts.timeline[-1]
        rate = f"; {rows / seconds:,.2f} images/s on average" if seconds else ""
        figures.append(
            (
                f"Throughput: rows written over run {facts.timeline_run}{rate}",
                svg_line(facts.timeline, f"seconds since {facts.timeline_since}", "rows written"),
            )
        )
    if facts.reasons:
        bars = [(reason, count, _colour(schema.INFER_ERROR)) for reason, count, _ in facts.reasons]
        figures.append(("Error reasons", svg_bars(bars, "error reasons", label_width=260)))
    body = "".join(f"<figure><figcaption>{_e(title)}</figcaption>{svg}</figure>" for title, svg in figures)
    note = (
        "<p class='note'>Throughput comes from the shards' write times: each shard is written once, "
        "as its write task finishes. Hover a bar or point for its numbers.</p>"
    )
    errors = ""
    if facts.reasons:
        rows = "".join(
            f"<tr><td class='n'>{count:,}</td><td>{_e(display_text(reason))}</td>"
            f"<td><code>{_e(display_text(example))}</code></td></tr>"
            for reason, count, example in facts.reasons
        )
        errors = (
            "<h3>Top error reasons</h3><table id='reasons'><tr><th>rows</th><th>reason</th><th>one message</th></tr>"
            f"{rows}</table>"
        )
    return f"<section id='plots'><h2>Plots</h2><div class='plots'>{body}</div>{note}{errors}</section>"


def _card(card: Card, columns: Columns, task: str | None) -> str:
    row = card.row
    status = row.get(schema.STATUS) or NO_STATUS
    failed = status != schema.OK
    if card.thumbnail:
        picture = f'<img class="thumb" src="{card.thumbnail}" alt="{_e(row.get(columns.id))}">'
    else:
        picture = (
            f'<div class="ph" title="{_e(card.why)}">no thumbnail<br>{_e(display_text(card.why or "", 120))}</div>'
        )
    lines = [
        f'<div class="card{" failed" if failed else ""}" data-status="{_e(status)}" data-failed="{int(failed)}">',
        f'<div class="frame">{picture}</div>',
        f'<div><span class="id">{_e(row.get(columns.id))}</span> '
        f'<span class="badge" style="background:{_colour(status)}">{_e(status)}</span></div>',
    ]
    question = row.get(columns.question) if task in (None, "vqa") else None
    if question:
        lines.append(f'<div class="q">Q: {_e(display_text(question))}</div>')
    prompt = row.get(columns.prompt)
    if prompt:
        lines.append(f'<div class="q">Prompt: {_e(display_text(prompt))}</div>')
    if row.get(schema.TEXT):
        lines.append(f'<div class="text">{_e(display_text(row[schema.TEXT]))}</div>')
    if row.get(schema.REASONING):
        lines.append(f"<details><summary>reasoning</summary>{_e(display_text(row[schema.REASONING]))}</details>")
    if failed:
        lines.append(f'<div class="err">{_e(display_text(row.get(schema.ERROR) or "(no message)"))}</div>')
    meta = []
    if row.get(schema.WIDTH) and row.get(schema.HEIGHT):
        meta.append(f"seen at {row[schema.WIDTH]}x{row[schema.HEIGHT]}")
    for name, label in ((schema.IMAGE_TOKENS, "image tok"), (schema.OUTPUT_TOKENS, "out tok")):
        if row.get(name) is not None:
            meta.append(f"{row[name]:,} {label}")
    if row.get(schema.FINISH_REASON):
        meta.append(str(row[schema.FINISH_REASON]))
    if meta:
        lines.append(f'<div class="meta">{_e(" · ".join(meta))}</div>')
    lines.append("</div>")
    return "".join(lines)


def _sheet_section(facts: Facts) -> str:
    shown = _ordered_status(Counter(card.row.get(schema.STATUS) or NO_STATUS for card in facts.cards))
    failed_shown = sum(n for s, n in shown.items() if s != schema.OK)
    buttons = [f'<button data-filter="all" class="on">all ({len(facts.cards):,})</button>']
    buttons += [f'<button data-filter="{_e(s)}">{_e(s)} ({n:,})</button>' for s, n in shown.items()]
    if len([s for s in shown if s != schema.OK]) > 1:
        buttons.append(f'<button data-filter="failed">every failure ({failed_shown:,})</button>')
    ok_rows = facts.status.get(schema.OK, 0)
    cards = "".join(_card(card, facts.columns, facts.task) for card in facts.cards)
    return (
        "<section id='contact'><h2>Contact sheet</h2>"
        f"<p class='note'>A seeded sample: {shown.get(schema.OK, 0):,} of {ok_rows:,} ok rows and "
        f"{failed_shown:,} of {facts.failed:,} failed rows. Showing <b id='shown'>{len(facts.cards):,}</b> cards.</p>"
        f"<div id='filters'>{''.join(buttons)}</div><div id='sheet'>{cards}</div></section>"
    )


def render(facts: Facts) -> str:
    """The whole page as one string: no external stylesheet, script, font or image."""
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    title = f"qwenbatch report: {facts.output}"
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>qwenbatch run report</h1><div class='where'>{_e(facts.output)} · generated {generated}"
        "</div></header><main>"
        f"{_summary_section(facts)}{_plots_section(facts)}{_sheet_section(facts)}"
        f"</main><script>{SCRIPT}</script></body></html>"
    )


def build_report(output: str, sample: int = DEFAULT_SAMPLE, failed: int = DEFAULT_FAILED, seed: int = 0) -> str:
    return render(gather(output, sample=sample, failed=failed, seed=seed))


def write_report(
    output: str, out: str, sample: int = DEFAULT_SAMPLE, failed: int = DEFAULT_FAILED, seed: int = 0
) -> int:
    """Write the report to a local path or an object-store URI; returns its size in bytes."""
    data = build_report(output, sample=sample, failed=failed, seed=seed).encode("utf-8")
    fs, path = storage.resolve(out)
    storage.write_bytes_atomic(fs, path, data)
    return len(data)
