"""The report's page: the facts gathered from an output, and how they are drawn (SVG plots, HTML).

Pure functions of `Facts`: nothing here reads the output, so the page can be checked from facts alone.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from qwenbatch import schema
from qwenbatch.report_svg import Histogram, display_text, escape, svg_bars, svg_histogram, svg_line
from qwenbatch.shards import NO_STATUS
from qwenbatch.status import FAILED, RUNNING, SUCCEEDED, duration_text, moment_text, occupancy_text
from qwenbatch.timing import on_cpu

STATUS_COLOURS = {
    schema.OK: "#3a9d5d",
    schema.LOAD_ERROR: "#e08a1e",
    schema.PROMPT_ERROR: "#8e5bc2",
    schema.INFER_ERROR: "#d2453a",
}
OTHER_COLOUR = "#8a8f98"


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


def ordered_status(counts: dict[str, int]) -> dict[str, int]:
    known = [s for s in schema.STATUSES if s in counts]
    return {s: counts[s] for s in known + sorted(set(counts) - set(known))}


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


def _num(key: str | None, value: Any, shown: str | None = None) -> str:
    """A number as shown, carrying its summary path in data-key so a reader (or a test) can check it;
    `shown` rounds it for people, and the exact value goes in data-value."""
    if value is None:
        return '<span class="num">—</span>'
    attr = f' data-key="{escape(key)}"' if key else ""
    if shown is not None:
        attr += f' data-value="{escape(str(value))}"'
    text = f"{value:,}" if isinstance(value, int | float) and not isinstance(value, bool) else str(value)
    return f'<span class="num"{attr}>{escape(text if shown is None else shown)}</span>'


def _tile(label: str, key: str | None, value: Any, unit: str = "", shown: str | None = None) -> str:
    suffix = f' <span class="unit">{escape(unit)}</span>' if unit and value is not None else ""
    value_html = f'<div class="value">{_num(key, value, shown)}{suffix}</div>'
    return f'<div class="tile"><div class="label">{escape(label)}</div>{value_html}</div>'


def _when(seconds: float | None) -> str:
    return moment_text(datetime.fromtimestamp(seconds, UTC)) if seconds is not None else "—"


def _started_text(summary: dict[str, Any]) -> str | None:
    """The summary's start time to the second; None when it has none."""
    started = summary.get("started")
    return moment_text(datetime.fromisoformat(started)) if started else None


def _summary_section(facts: Facts) -> str:
    summary = facts.summary or {}
    this_run = summary.get("this_run") or {}
    state = facts.state
    parts = ["<section id='summary'><h2>Run summary</h2>"]
    if not facts.summary:
        parts.append(
            f"<div class='warn'>No {escape(schema.SUMMARY_FILE)}: the run is still going or stopped early. "
            "Every count below comes from the shards written so far.</div>"
        )
    elif (summary.get("output") or {}).get("rows") != facts.rows:
        parts.append(
            f"<div class='warn'>The shards hold {facts.rows:,} rows; {escape(schema.SUMMARY_FILE)} counted "
            f"{(summary.get('output') or {}).get('rows', 0):,}. A later run wrote rows without finishing. "
            "Counts below come from the shards.</div>"
        )
    colour = {SUCCEEDED: STATUS_COLOURS[schema.OK], FAILED: STATUS_COLOURS[schema.INFER_ERROR]}.get(state, "#c77700")
    error_rate = round(facts.failed / facts.rows, 6) if facts.rows else 0.0
    parts.append(
        f"<p><span class='badge' style='background:{colour}' id='state'>{escape(state)}</span> "
        f"run {_num('run_id' if facts.summary else None, summary.get('run_id'))} · "
        f"task <b>{escape(facts.task or '—')}</b> · model <code>{escape(facts.model or '—')}</code> · "
        f"started {_num('started' if facts.summary else None, summary.get('started'), _started_text(summary))}</p>"
        "<div class='tiles'>"
    )
    tiles = [
        _tile("rows in the output", "output.rows", facts.rows),
        *(_tile(f"status {s}", f"output.status.{s}", n) for s, n in facts.status.items()),
        _tile("error rate", "error_rate", error_rate, shown=_percent(error_rate)),
        _tile("input tokens", "output.input_tokens", facts.input_tokens),
        _tile("output tokens", "output.output_tokens", facts.output_tokens),
    ]
    if facts.summary:
        duration = summary.get("duration_s")
        tiles += [
            _tile("manifest rows", "manifest_rows", summary.get("manifest_rows")),
            _tile("already done before", "skipped_done", summary.get("skipped_done")),
            _tile("this run: rows", "this_run.rows", this_run.get("rows")),
            _tile("this run: duration", "duration_s", duration, shown=duration_text(duration or 0)),
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
        rows = "".join(
            f"<tr><td>{escape(k)}</td><td class='n'>{v:,}</td></tr>" for k, v in sorted(facts.finish.items())
        )
        parts.append(f"<div><h3>Finish reasons</h3><table>{rows}</table></div>")
    if facts.runs:
        rows = "".join(
            f"<tr><td><code>{escape(r['run_id'])}</code></td><td class='n'>{r['rows']:,}</td>"
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
            f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in (summary.get("versions") or {}).items()
        )
        parts.append(
            f"<details><summary>Config</summary><pre>{escape(config)}</pre></details>"
            f"<details><summary>Versions</summary><table>{versions}</table></details>"
        )
    parts.append("</section>")
    return "".join(parts)


def _percent(share: float | None) -> str:
    return "—" if share is None else f"{share:.1%}"


def _busy_block(busy: dict[str, Any], live: bool) -> str:
    """How busy the replicas kept their GPUs: under 95% they waited on the CPU side, so add CPUs.
    Replicas on the CPU have no GPU: there the figure is the replicas' own, with no advice on GPUs."""
    figures = busy.get("replicas") or {}
    share = busy.get("gpu_busy")
    cpu = on_cpu(busy)
    advice = "" if cpu else " Under 95%, the GPUs waited for rows or for batches to be prepared: add CPUs per GPU."
    key = None if live else "gpu_busy"  # a running run's figures are not in the summary yet
    rows = "".join(
        f"<tr><td><code>{escape(r['replica'])}</code></td><td>{escape(r['device'])}</td>"
        f"<td class='n'>{_percent(r['busy'])}</td>"
        f"<td class='n'>{r['generate_s']:,.1f}</td><td class='n'>{r['prepare_s']:,.1f}</td>"
        f"<td class='n'>{r['wait_s']:,.1f}</td><td class='n'>{r['batches']:,}</td><td class='n'>{r['rows']:,}</td></tr>"
        for r in figures.get("each", [])
    )
    engine = figures.get("engine")
    occupancy = (
        "<p>vLLM engine: "
        + escape(occupancy_text(engine))
        + ". Starved: a step run under the in-flight target while rows waited in the replica to be added.</p>"
        if engine
        else ""
    )
    return (
        f"<div id='busy'><h3>{'Replica' if cpu else 'GPU'} busy{' (running)' if live else ''}: {_percent(share)}</h3>"
        f"<p>Time in <code>generate</code> over {figures.get('count', 0)} replica(s) x "
        f"{duration_text(figures.get('window_s', 0))} from the first <code>generate</code> to the last: "
        f"{_num(key, share, _percent(share))}.{escape(advice)}</p>"
        "<table><tr><th>replica</th><th>device</th><th>busy</th><th>generate (s)</th><th>preparing (s)</th>"
        f"<th>waiting for rows (s)</th><th>batches</th><th>rows</th></tr>{rows}</table>{occupancy}</div>"
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
    body = "".join(f"<figure><figcaption>{escape(title)}</figcaption>{svg}</figure>" for title, svg in figures)
    note = (
        "<p class='note'>Throughput comes from the shards' write times: each shard is written once, "
        "as its write task finishes. Hover a bar or point for its numbers.</p>"
    )
    errors = ""
    if facts.reasons:
        rows = "".join(
            f"<tr><td class='n'>{count:,}</td><td>{escape(display_text(reason))}</td>"
            f"<td><code>{escape(display_text(example))}</code></td></tr>"
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
        picture = f'<img class="thumb" src="{card.thumbnail}" alt="{escape(row.get(columns.id))}">'
    else:
        why = escape(display_text(card.why or "", 120))
        picture = f'<div class="ph" title="{escape(card.why)}">no thumbnail<br>{why}</div>'
    lines = [
        f'<div class="card{" failed" if failed else ""}" data-status="{escape(status)}" data-failed="{int(failed)}">',
        f'<div class="frame">{picture}</div>',
        f'<div><span class="id">{escape(row.get(columns.id))}</span> '
        f'<span class="badge" style="background:{_colour(status)}">{escape(status)}</span></div>',
    ]
    question = row.get(columns.question) if task in (None, "vqa") else None
    if question:
        lines.append(f'<div class="q">Q: {escape(display_text(question))}</div>')
    prompt = row.get(columns.prompt)
    if prompt:
        lines.append(f'<div class="q">Prompt: {escape(display_text(prompt))}</div>')
    if row.get(schema.TEXT):
        lines.append(f'<div class="text">{escape(display_text(row[schema.TEXT]))}</div>')
    if row.get(schema.REASONING):
        lines.append(f"<details><summary>reasoning</summary>{escape(display_text(row[schema.REASONING]))}</details>")
    if failed:
        lines.append(f'<div class="err">{escape(display_text(row.get(schema.ERROR) or "(no message)"))}</div>')
    meta = []
    if row.get(schema.WIDTH) and row.get(schema.HEIGHT):
        meta.append(f"seen at {row[schema.WIDTH]}x{row[schema.HEIGHT]}")
    for name, label in ((schema.IMAGE_TOKENS, "image tok"), (schema.OUTPUT_TOKENS, "out tok")):
        if row.get(name) is not None:
            meta.append(f"{row[name]:,} {label}")
    if row.get(schema.FINISH_REASON):
        meta.append(str(row[schema.FINISH_REASON]))
    if meta:
        lines.append(f'<div class="meta">{escape(" · ".join(meta))}</div>')
    lines.append("</div>")
    return "".join(lines)


def _sheet_section(facts: Facts) -> str:
    shown = ordered_status(Counter(card.row.get(schema.STATUS) or NO_STATUS for card in facts.cards))
    failed_shown = sum(n for s, n in shown.items() if s != schema.OK)
    buttons = [f'<button data-filter="all" class="on">all ({len(facts.cards):,})</button>']
    buttons += [f'<button data-filter="{escape(s)}">{escape(s)} ({n:,})</button>' for s, n in shown.items()]
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
    generated = moment_text(datetime.now(UTC))
    title = f"qwenbatch report: {facts.output}"
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>qwenbatch run report</h1><div class='where'>{escape(facts.output)} · generated {generated}"
        "</div></header><main>"
        f"{_summary_section(facts)}{_plots_section(facts)}{_sheet_section(facts)}"
        f"</main><script>{SCRIPT}</script></body></html>"
    )
