"""Write stage: the row contract's columns, deterministic shard names, atomic writes, summary."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from ray.data import Datasink
from ray.data.block import BlockAccessor

from qwenbatch import schema, storage


def finalize_batch(batch: pa.Table, *, model: str, task: str, run_id: str) -> pa.Table:
    """Drop raw bytes and internal columns; give every output column its one fixed type."""
    batch = batch.drop_columns([c for c in schema.DROPPED_COLUMNS if c in batch.column_names])
    provenance = {schema.MODEL: model, schema.TASK: task, schema.RUN_ID: run_id}
    for field in schema.OUTPUT_FIELDS:
        if field.name in provenance:
            values = pa.array([provenance[field.name]] * batch.num_rows, field.type)
        elif field.name in batch.column_names:
            values = batch.column(field.name).cast(field.type)
        else:
            values = pa.nulls(batch.num_rows, field.type)
        if field.name in batch.column_names:
            batch = batch.set_column(batch.column_names.index(field.name), field, values)
        else:
            batch = batch.append_column(field, values)
    return batch


def shard_name(ids: Iterable[Any]) -> str:
    """Named by the ids it holds: a rerun that writes the same rows overwrites, never duplicates."""
    digest = hashlib.sha1("\0".join(sorted(str(i) for i in ids)).encode()).hexdigest()[:24]
    return f"part-{digest}.parquet"


def shard_stats(table: pa.Table) -> dict[str, Any]:
    statuses = Counter(table.column(schema.STATUS).to_pylist())
    return {
        "rows": table.num_rows,
        "status": dict(statuses),
        "input_tokens": pc.sum(table.column(schema.INPUT_TOKENS)).as_py() or 0,
        "output_tokens": pc.sum(table.column(schema.OUTPUT_TOKENS)).as_py() or 0,
    }


def _merge(stats: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"rows": 0, "status": Counter(), "input_tokens": 0, "output_tokens": 0, "shards": 0}
    for item in stats:
        if not item:
            continue
        total["shards"] += 1
        total["rows"] += item["rows"]
        total["status"].update(item["status"])
        total["input_tokens"] += item["input_tokens"]
        total["output_tokens"] += item["output_tokens"]
    total["status"] = dict(total["status"])
    return total


class ShardSink(Datasink):
    """Writes each write task's rows as one Parquet shard, atomically, under a deterministic name."""

    def __init__(self, output: str, id_column: str) -> None:
        self.output = output
        self.id_column = id_column
        self.filesystem, self.base = storage.resolve(output)  # resolved here, on the driver: workers get its settings
        self.written: dict[str, Any] = _merge([])

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {}
        table = pa.concat_tables(tables, promote_options="default")
        storage.write_parquet_atomic(
            self.filesystem, storage.join(self.base, shard_name(table.column(self.id_column).to_pylist())), table
        )
        return shard_stats(table)

    def on_write_complete(self, write_result: Any) -> None:
        self.written = _merge(write_result.write_returns)


def done_ids(output: str, id_column: str) -> pa.Array:
    """Ids already written to the output: the resume key. Empty when there is no output yet."""
    fs, base = storage.resolve(output)
    files = storage.parquet_files(fs, base)
    if not files:
        return pa.array([], pa.string())
    table = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=[id_column])
    return pc.unique(pc.cast(table.column(id_column), pa.string()).combine_chunks())


def remove_stale_temp(output: str) -> int:
    """Delete temp files a killed writer left behind; readers skip them anyway, this only frees space.

    Runs before any writer of this run starts; two runs writing one output at once are not supported.
    """
    fs, base = storage.resolve(output)
    if not storage.is_local(fs) or not os.path.isdir(base):
        return 0  # object stores publish whole objects only: they hold no temp files
    stale = [entry.path for entry in os.scandir(base) if entry.is_file() and entry.name.startswith(schema.TEMP_PREFIX)]
    for path in stale:
        os.remove(path)
    return len(stale)


def summarize_output(output: str, top_errors: int = 10) -> dict[str, Any]:
    """Counts over the whole output (all runs that wrote to it), read from its shards."""
    fs, base = storage.resolve(output)
    files = storage.parquet_files(fs, base)
    columns = [schema.STATUS, schema.ERROR, schema.INPUT_TOKENS, schema.OUTPUT_TOKENS]
    if not files:
        return {"rows": 0, "status": {}, "top_errors": [], "input_tokens": 0, "output_tokens": 0}
    table = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns)
    errors = Counter(e for e in table.column(schema.ERROR).to_pylist() if e)
    return {
        "rows": table.num_rows,
        "status": dict(Counter(table.column(schema.STATUS).to_pylist())),
        "top_errors": [{"error": e, "count": n} for e, n in errors.most_common(top_errors)],
        "input_tokens": pc.sum(table.column(schema.INPUT_TOKENS)).as_py() or 0,
        "output_tokens": pc.sum(table.column(schema.OUTPUT_TOKENS)).as_py() or 0,
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
