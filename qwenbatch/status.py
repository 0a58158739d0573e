"""`qwenbatch status OUTPUT`: what an output folder says about its run, printed as a table.

The state comes from the output folder alone, so it reads the same from any machine and on any
storage, with no cluster to ask:

- `running`: shards newer than `_summary.json`, or shards and no summary yet. A run becomes
  visible once its first shard lands; a run that was killed looks the same until it is rerun,
  so the table shows how long ago the last shard was written.
- `succeeded`: `_SUCCESS` is present (it is written after the summary, only for a complete run).
- `failed` / `partial`: the summary's verdict: too many failed rows for `--max-error-rate`, or rows
  of the manifest still missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow.fs as pafs

from qwenbatch import schema, storage
from qwenbatch.shards import list_shards
from qwenbatch.summary import read_summary, summarize_output
from qwenbatch.timing import busy_summary, live_figures, on_cpu

RUNNING = "running"
SUCCEEDED = "succeeded"
PARTIAL = "partial"
FAILED = "failed"
TOP_ERRORS_SHOWN = 5


class NoRunError(ValueError):
    """The folder holds neither shards nor a summary: no run has written there."""


@dataclass(frozen=True)
class RunStatus:
    output: str
    state: str
    summary: dict[str, Any] | None  # the last finished run's summary, when there is one
    totals: dict[str, Any]  # rows by status, top errors, tokens: over the whole output
    shards: int
    last_write: datetime | None  # newest shard
    summary_written: datetime | None
    busy: dict[str, Any] | None = None  # `timing.busy_summary` of the running run, or the finished one's

    def as_dict(self) -> dict[str, Any]:
        this_run = (self.summary or {}).get("this_run", {})
        return {
            "output": self.output,
            "state": self.state,
            "run_id": (self.summary or {}).get("run_id"),
            "started": (self.summary or {}).get("started"),
            "duration_s": (self.summary or {}).get("duration_s"),
            "manifest_rows": (self.summary or {}).get("manifest_rows"),
            "shards": self.shards,
            "last_write": self.last_write.isoformat() if self.last_write else None,
            "output_rows": self.totals,
            "this_run": this_run,
            "gpu_busy": (self.busy or {}).get("gpu_busy"),
            "replicas": (self.busy or {}).get("replicas"),
        }


def _mtime(fs: pafs.FileSystem, path: str) -> datetime | None:
    info = fs.get_file_info(path)
    return info.mtime if info.type != pafs.FileType.NotFound else None


def read_status(output: str) -> RunStatus:
    """Decide the run's state by the rule in the module docstring; counts come from the summary
    when it is current, else from the shards' indexes."""
    fs, base = storage.resolve(output)
    times = [datetime.fromtimestamp(s.mtime, UTC) for s in list_shards(fs, base) if s.mtime is not None]
    summary = read_summary(output)
    summary_written = _mtime(fs, storage.join(base, schema.SUMMARY_FILE))
    if not times and summary is None:
        raise NoRunError(f"{output}: no run found (no shards, no {schema.SUMMARY_FILE})")
    last_write = max(times) if times else None
    if summary is None or (last_write and summary_written and last_write > summary_written):
        state = RUNNING
        totals = summarize_output(output, top_errors=TOP_ERRORS_SHOWN)
        live = live_figures(output)
        busy = busy_summary(live[1]) if live else None
    else:
        complete = storage.exists(fs, storage.join(base, schema.SUCCESS_FILE))
        state = SUCCEEDED if complete else (FAILED if summary.get("state") == FAILED else PARTIAL)
        totals = summary.get("output", {})
        busy = summary if (summary.get("replicas") or {}).get("count") else None
    return RunStatus(output, state, summary, totals, len(times), last_write, summary_written, busy)


def _ago(moment: datetime, now: datetime) -> str:
    return f"{duration_text((now - moment).total_seconds())} ago"


def duration_text(seconds: float) -> str:
    """A duration as people read it: `57 s`, `3 min 12 s`, `1 h 02 min` (past an hour, seconds are noise)."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min"


def moment_text(moment: datetime) -> str:
    """A time as people read it, to the second: `2026-12-03 18:27:52 UTC`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _rate(value: float | None, unit: str) -> str:
    return f"{value:,.2f} {unit}/s" if value is not None else "-"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _fill(seconds: float | None) -> str:
    return "" if seconds is None else f" (the first batch took {seconds:,.1f} s to prepare)"


def busy_lines(busy: dict[str, Any]) -> list[str]:
    """GPU busy time: under 95% the replicas waited on the CPU side (add CPUs), near 100% add GPUs.
    Replicas on the CPU have no GPU to keep busy: there the same figure is the replicas' own."""
    replicas = busy.get("replicas") or {}
    count = replicas.get("count", 0)
    label = "replica busy" if on_cpu(busy) else "gpu busy"
    lines = [
        f"{label:<10} {_share(busy.get('gpu_busy'))} over {count} replica{'s' if count != 1 else ''}: "
        f"generate {replicas.get('generate_s', 0):,.1f} s, preparing {replicas.get('prepare_s', 0):,.1f} s "
        f"(overlapped), waiting for rows {replicas.get('wait_s', 0):,.1f} s, of {replicas.get('window_s', 0):,.1f} s "
        f"from the first generate to the last" + _fill(replicas.get("fill_s"))
    ]
    if engine := replicas.get("engine"):
        lines.append(occupancy_line(engine))
    each = replicas.get("each", [])
    if len(each) > 1:
        lines += [
            f"{'':<11}{r['replica']} ({r['device']}): busy {_share(r['busy'])}, {r['batches']:,} batches, "
            f"{r['rows']:,} rows" + (f"; {occupancy_text(r)}" if r.get("steps") else "")
            for r in each
        ]
    return lines


def occupancy_text(figures: dict[str, Any]) -> str:
    """The vLLM engine's occupancy: running requests per step against the replica's in-flight target."""
    mean, filled = figures.get("running_mean"), figures.get("filled_running_mean")
    return (
        f"{_number(mean)} running requests per step (max {figures.get('running_max', 0):,}, "
        f"{_number(filled)} once the engine held its target of {figures.get('in_flight_target', 0):,}; "
        f"running and queued {_number(figures.get('filled_in_engine_mean'))}), "
        f"starved {_share(figures.get('starved'))} of {figures.get('steps', 0):,} steps, "
        f"KV cache peak {_share(figures.get('kv_cache_peak'))}"
    )


def occupancy_line(engine: dict[str, Any]) -> str:
    return f"{'engine':<10} {occupancy_text(engine)}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def done_inputs(totals: dict[str, Any]) -> int:
    """Manifest rows the output finishes: a PDF's pages are several output rows and one manifest row."""
    return totals.get("inputs", totals.get("rows", 0))  # summaries from before PDFs have no inputs


def page_rows_note(totals: dict[str, Any]) -> str:
    rows = totals.get("rows", 0)
    return "" if rows == done_inputs(totals) else f", written as {rows:,} output rows (a row per PDF page)"


def format_status(status: RunStatus, now: datetime | None = None) -> str:
    """The table `qwenbatch status` prints."""
    now = now or datetime.now(UTC)
    summary = status.summary or {}
    totals = status.totals
    rows = totals.get("rows", 0)
    lines = [f"{'output':<11}{status.output}", f"{'state':<11}{status.state}"]
    if status.state == RUNNING:
        lines.append(f"{'progress':<11}{rows:,} rows written so far, shards: {status.shards}")
        if status.last_write:
            lines.append(f"{'last write':<11}{_ago(status.last_write, now)}")
    if summary:
        prefix = "last run" if status.state == RUNNING else "run"
        started = datetime.fromisoformat(summary["started"])
        took = summary.get("duration_s") or 0
        finished = started + timedelta(seconds=took)
        lines.append(
            f"{prefix:<11}{summary.get('run_id', '?')}: started {moment_text(started)}, "
            f"took {duration_text(took)}, finished {_ago(finished, now)}"
        )
    if summary and status.state != RUNNING:
        this_run = summary.get("this_run", {})
        lines.append(
            f"{'rows':<11}{done_inputs(totals):,} of {summary.get('manifest_rows', 0):,} in the manifest "
            f"(this run {this_run.get('inputs', this_run.get('rows', 0)):,}; "
            f"{summary.get('skipped_done', 0):,} already done){page_rows_note(totals)}"
        )
        lines.append(
            f"{'throughput':<11}{_rate(this_run.get('images_per_s'), 'images')}, "
            f"{_rate(this_run.get('output_tokens_per_s'), 'output tokens')} (this run)"
        )
    lines.append(f"{'tokens':<11}input {totals.get('input_tokens', 0):,}, output {totals.get('output_tokens', 0):,}")
    if status.busy:
        lines += busy_lines(status.busy)
    counts = totals.get("status", {})
    if counts:
        width = max(len("rows"), *(len(f"{n:,}") for n in counts.values()))
        lines += ["", f"{'status':<14}{'rows':>{width}}  {'share':>7}"]
        for name in sorted(counts, key=lambda s: (s != schema.OK, -counts[s], s)):
            share = counts[name] / rows if rows else 0.0
            lines.append(f"{name:<14}{counts[name]:>{width},}  {share:>7.2%}")
    errors = totals.get("top_errors", [])[:TOP_ERRORS_SHOWN]
    if errors:
        lines += ["", "top errors"]
        lines += [f"{item['count']:>8,} x {item['error']}" for item in errors]
    return "\n".join(lines)
