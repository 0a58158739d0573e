"""A run's verdict: `_summary.json` and `_SUCCESS`, written at its end, read by status, report and the next run.

The counts come from the shards' indexes (`shards.read_stats`), so they cover every run that wrote
to the output and cost the number of shards, not of rows.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from qwenbatch import schema, storage
from qwenbatch.config import JobConfig, config_snapshot
from qwenbatch.inputs import Manifest
from qwenbatch.shards import list_shards, merge_stats, read_stats

VERSIONED = ("qwenbatch", "ray", "transformers", "torch", "torchvision", "pyarrow", "pillow")


def summarize_output(output: str, top_errors: int = 10) -> dict[str, Any]:
    """Counts over the whole output (all runs that wrote to it), from its shards' indexes.

    `top_errors` counts each message over the shards that kept it among their most common ones
    (`schema.STATS_ERRORS_KEPT`), so a message spread thin over many shards may count short.
    """
    fs, base = storage.resolve(output)
    totals = merge_stats(read_stats(fs, list_shards(fs, base)))
    errors = sorted(totals["errors"].items(), key=lambda item: (-item[1], item[0]))[:top_errors]
    return {
        "rows": totals["rows"],
        "inputs": totals["inputs"],
        "status": totals["status"],
        "top_errors": [{"error": e, "count": n} for e, n in errors],
        "input_tokens": totals["input_tokens"],
        "output_tokens": totals["output_tokens"],
    }


def write_summary(output: str, summary: dict[str, Any], success: bool) -> None:
    """The summary first, then `_SUCCESS`: a marker always means a complete, summarised output."""
    fs, base = storage.resolve(output)
    storage.write_bytes_atomic(fs, storage.join(base, schema.SUMMARY_FILE), json.dumps(summary, indent=2).encode())
    if success:
        storage.write_bytes_atomic(fs, storage.join(base, schema.SUCCESS_FILE), b"")


def read_summary(output: str) -> dict[str, Any] | None:
    fs, base = storage.resolve(output)
    path = storage.join(base, schema.SUMMARY_FILE)
    if not storage.exists(fs, path):
        return None
    with fs.open_input_stream(path) as handle:
        return json.loads(handle.read())


def is_complete(output: str) -> bool:
    fs, base = storage.resolve(output)
    return storage.exists(fs, storage.join(base, schema.SUCCESS_FILE))


def withdraw_success(output: str) -> None:
    """A forced run that adds rows withdraws `_SUCCESS` first: if it dies, the next run must not skip."""
    fs, base = storage.resolve(output)
    path = storage.join(base, schema.SUCCESS_FILE)
    if storage.exists(fs, path):
        fs.delete_file(path)


def versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def build_summary(
    config: JobConfig,
    manifest: Manifest,
    run_id: str,
    started: float,
    elapsed: float,
    written: dict[str, Any],
    todo: int,
) -> dict[str, Any]:
    from qwenbatch.engine_vllm import vllm_versions  # the vLLM engine's module, only for its runs' summaries

    totals = summarize_output(config.output.path)
    errors = totals["rows"] - totals["status"].get(schema.OK, 0)
    error_rate = errors / totals["rows"] if totals["rows"] else 0.0
    complete = written["inputs"] == todo and totals["inputs"] >= manifest.rows  # a PDF: one input, many rows
    if not complete:
        state = "partial"
    elif error_rate > config.output.max_error_rate:
        state = "failed"
    else:
        state = "succeeded"
    return {
        "run_id": run_id,
        "state": state,
        "started": datetime.fromtimestamp(started, UTC).isoformat(),
        "duration_s": round(elapsed, 3),
        "manifest_rows": manifest.rows,
        "skipped_done": manifest.rows - todo,
        "this_run": {
            "rows": written["rows"],
            "inputs": written["inputs"],
            "status": written["status"],
            "input_tokens": written["input_tokens"],
            "output_tokens": written["output_tokens"],
            "shards": written["shards"],
            "images_per_s": round(written["rows"] / elapsed, 3) if elapsed else None,
            "output_tokens_per_s": round(written["output_tokens"] / elapsed, 3) if elapsed else None,
        },
        "output": totals,
        "error_rate": round(error_rate, 6),
        "max_error_rate": config.output.max_error_rate,
        "config": config_snapshot(config),
        "versions": versions() | (vllm_versions() if config.model.engine == "vllm" else {}),
    }
