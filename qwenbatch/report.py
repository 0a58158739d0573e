"""The HTML report of a run: summary, plots and a contact sheet of thumbnails, in one self-contained file.

People judge a run by looking at it: are the captions any good, what failed and why, how fast did it go.
Everything the page needs is inside it (inline CSS, JS and SVG, thumbnails as base64 JPEG), so it opens
offline and can be attached to a ticket. Counts come from the shards' stats (kept in their indexes), so a
partial run with no summary gets a report too, and neither the time to build the page nor its size grows
with the rows of the output, only with its shards and the sample.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from qwenbatch import schema, storage
from qwenbatch.config import JobConfig
from qwenbatch.decode import fetch_bytes, open_checked, to_rgb
from qwenbatch.locations import LoadLimits
from qwenbatch.pipeline import limits_for
from qwenbatch.report_page import Card, Columns, Facts, ordered_status, render
from qwenbatch.report_svg import Histogram
from qwenbatch.rows import error_message
from qwenbatch.shards import Shard, list_shards, merge_stats, read_stats
from qwenbatch.status import read_status

DEFAULT_SAMPLE = 200  # ok rows on the contact sheet
DEFAULT_FAILED = 100  # failed rows on the contact sheet
THUMB_PX = 160
THUMB_QUALITY = 70
REPORT_FETCH_TIMEOUT_S = 10.0
REPORT_FETCH_RETRIES = 1
THUMB_WORKERS = 8  # reading images is I/O bound on object stores; decoding releases the GIL
TOP_REASONS = 12
HISTOGRAM_BINS = 20
SAMPLE_POOL = 4  # the contact sheet draws from shards holding this many times its sample, at least


# --- gathering ------------------------------------------------------------------------------------


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
        status=ordered_status(totals["status"]),
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
