"""The output's shards, and what each holds kept beside it: resume, summaries, `status` and `report`
read that, never the shards' columns.

A shard `part-<digest>.parquet` is named by the hash of the ids it holds, so writing the same rows
again overwrites it and never duplicates them. Its index `_index/part-<digest>.parquet`, written after
it, holds the ids' hashes sorted (row groups with min/max statistics, so a range of hashes reads only
its row groups) and, in its metadata, the shard's stats: rows by status, tokens, error messages and
reasons, finish reasons, token histograms, run ids. A shard without an index (a run killed between
the two writes, or an output of an older qwenbatch) gets one from its own columns: in memory when
`status` or `report` read it, on disk when the next run starts (`add_missing_indexes`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from qwenbatch import schema, storage
from qwenbatch.documents import resume_keys
from qwenbatch.ids import Hashes, IdSorter, SortedIds, hash_ids

NO_STATUS = "(none)"  # a row without a status: never written by qwenbatch, but counted, not dropped
NO_MESSAGE = "(no message)"
NO_RUN_ID = "(no run id)"
READERS = 16  # index files read at once: many small reads, which object stores answer in parallel
STATS_COLUMNS = (
    schema.STATUS,
    schema.ERROR,
    schema.INPUT_TOKENS,
    schema.OUTPUT_TOKENS,
    schema.IMAGE_TOKENS,
    schema.FINISH_REASON,
    schema.RUN_ID,
    schema.TASK,
    schema.MODEL,
    schema.PAGE,
)
COUNTED = (  # the stats that count rows by a value: merged by adding the counts up
    "status",
    "errors",
    "reasons_count",
    "finish",
    "output_tokens_hist",
    "image_tokens_hist",
    "runs",
    "tasks",
    "models",
)


@dataclass(frozen=True)
class Shard:
    path: str
    mtime: float | None  # when it was written (once, and again only when a retry swaps rows in)
    index: str | None  # its index file, when there is one


def error_reason(messages: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Messages that differ only in a path or a number are one reason."""
    masked = pc.replace_substring_regex(messages, r"\S*[/\\]\S*", "…")
    return pc.replace_substring_regex(masked, r"\d+", "N")


def _column(table: pa.Table, name: str, kind: pa.DataType) -> pa.ChunkedArray:
    if name in table.column_names:
        return table.column(name).cast(kind)
    return pa.chunked_array([pa.nulls(table.num_rows, kind)], kind)


def _counts(values: pa.Array | pa.ChunkedArray, keep: int | None = None) -> dict[str, int]:
    """Value -> rows, nulls left out; the `keep` most common when given."""
    if not len(values):
        return {}
    counted = pc.value_counts(pc.drop_null(values))
    pairs = zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True)
    ranked = sorted(pairs, key=lambda item: (-item[1], str(item[0])))[:keep]
    return {str(value): count for value, count in ranked}


def shard_stats(table: pa.Table, id_column: str = schema.ID, inputs: int | None = None) -> dict[str, Any]:
    """What summaries, `status` and `report` need of a shard, as JSON-ready counts.

    `inputs`: the manifest rows the shard finishes (a PDF's pages finish one), when the caller has counted
    them (`documents.resume_keys`); else counted here.
    """
    if inputs is None:
        inputs = resume_keys(table, id_column)[1] if id_column in table.column_names else table.num_rows
    status = pc.fill_null(_column(table, schema.STATUS, pa.string()), NO_STATUS)
    error = _column(table, schema.ERROR, pa.string())
    failed = pc.not_equal(status, schema.OK)
    failed_errors = pc.fill_null(pc.filter(error, failed), NO_MESSAGE)
    reasons = pa.table({"reason": error_reason(failed_errors), "error": failed_errors})
    grouped = reasons.group_by("reason", use_threads=False).aggregate([("error", "count"), ("error", "first")])
    ranked = grouped.sort_by([("error_count", "descending"), ("reason", "ascending")]).slice(
        0, schema.STATS_REASONS_KEPT
    )
    return {
        "rows": table.num_rows,
        "inputs": inputs,
        "status": _counts(status),
        "input_tokens": pc.sum(_column(table, schema.INPUT_TOKENS, pa.int64())).as_py() or 0,
        "output_tokens": pc.sum(_column(table, schema.OUTPUT_TOKENS, pa.int64())).as_py() or 0,
        "errors": _counts(error, schema.STATS_ERRORS_KEPT),
        "reasons_count": dict(
            zip(ranked.column("reason").to_pylist(), ranked.column("error_count").to_pylist(), strict=True)
        ),
        "reasons_example": dict(
            zip(ranked.column("reason").to_pylist(), ranked.column("error_first").to_pylist(), strict=True)
        ),
        "finish": _counts(_column(table, schema.FINISH_REASON, pa.string())),
        "output_tokens_hist": _counts(_column(table, schema.OUTPUT_TOKENS, pa.int64())),
        "image_tokens_hist": _counts(_column(table, schema.IMAGE_TOKENS, pa.int64())),
        "runs": _counts(pc.fill_null(_column(table, schema.RUN_ID, pa.string()), NO_RUN_ID)),
        "tasks": _counts(_column(table, schema.TASK, pa.string())),
        "models": _counts(_column(table, schema.MODEL, pa.string())),
    }


def merge_stats(stats: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Shards' stats added up: counts summed; each reason keeps the first example seen."""
    total: dict[str, Any] = {"rows": 0, "inputs": 0, "input_tokens": 0, "output_tokens": 0, "shards": 0}
    total["reasons_example"] = {}
    counters = {key: Counter() for key in COUNTED}
    for item in stats:
        total["shards"] += item.get("shards", 1)  # a shard's stats, or totals already merged
        for key in ("rows", "input_tokens", "output_tokens"):
            total[key] += item.get(key, 0)
        total["inputs"] += item.get("inputs", item.get("rows", 0))  # indexes from before PDFs: a row an input
        for key in COUNTED:
            counters[key].update(item.get(key, {}))
        for reason, example in item.get("reasons_example", {}).items():
            total["reasons_example"].setdefault(reason, example)
    return total | {key: dict(counter) for key, counter in counters.items()}


def shard_name(hashes: Hashes) -> str:
    """Named by the ids it holds (their sorted hashes): the same rows written again keep the same name."""
    digest = hashlib.sha1(hashes.hi.tobytes() + hashes.lo.tobytes()).hexdigest()[:24]
    return f"part-{digest}.parquet"


def index_path(base: str, name: str) -> str:
    return storage.join(storage.join(base, schema.INDEX_DIR), name)


def write_index(fs: pafs.FileSystem, base: str, name: str, hashes: Hashes, stats: dict[str, Any]) -> str:
    table = pa.table({schema.INDEX_HI: hashes.hi, schema.INDEX_LO: hashes.lo})
    table = table.replace_schema_metadata({schema.STATS_KEY: json.dumps(stats).encode()})
    path = index_path(base, name)
    storage.write_parquet_atomic(fs, path, table, compression="none", row_group_size=schema.INDEX_ROW_GROUP)
    return path


def keyed(table: pa.Table, id_column: str) -> tuple[Hashes, dict[str, Any]]:
    """What a shard's index holds: the hashes resume matches (`documents.resume_keys`), and its stats."""
    keys, inputs = resume_keys(table, id_column)
    return hash_ids(keys).sorted(), shard_stats(table, id_column, inputs)


def write_shard(
    fs: pafs.FileSystem,
    base: str,
    table: pa.Table,
    id_column: str,
    before_publish: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The shard, then its index; returns its stats. `before_publish` runs just before the shard appears."""
    hashes, stats = keyed(table, id_column)
    name = shard_name(hashes)
    storage.write_parquet_atomic(fs, storage.join(base, name), table, before_publish)
    write_index(fs, base, name, hashes, stats)
    return stats


def list_shards(fs: pafs.FileSystem, base: str) -> list[Shard]:
    """The data shards, in name order, each with its index file when it has one."""
    indexes = {
        info.base_name: info.path
        for info in storage.list_files(fs, storage.join(base, schema.INDEX_DIR), (".parquet",))
    }
    return [
        Shard(info.path, info.mtime.timestamp() if info.mtime else None, indexes.get(info.base_name))
        for info in storage.list_files(fs, base, (".parquet",))
    ]


def _from_shard(fs: pafs.FileSystem, shard: Shard, id_column: str) -> tuple[Hashes, dict[str, Any]]:
    dataset = pads.dataset(shard.path, filesystem=fs, format="parquet")
    wanted = [c for c in (id_column, *STATS_COLUMNS) if c in dataset.schema.names]
    return keyed(dataset.to_table(columns=wanted), id_column)


def _stats(fs: pafs.FileSystem, shard: Shard, id_column: str) -> dict[str, Any]:
    if shard.index is None:
        return _from_shard(fs, shard, id_column)[1]
    return json.loads(pq.read_metadata(shard.index, filesystem=fs).metadata[schema.STATS_KEY])


def read_stats(fs: pafs.FileSystem, shards: list[Shard], id_column: str = schema.ID) -> list[dict[str, Any]]:
    """Each shard's stats, from its index's metadata; from its own columns when it has no index."""
    with ThreadPoolExecutor(READERS) as pool:
        return list(pool.map(lambda shard: _stats(fs, shard, id_column), shards))


def add_missing_indexes(fs: pafs.FileSystem, base: str, shards: list[Shard], id_column: str) -> list[Shard]:
    """Write the index of every shard that lacks one; the shards, all indexed."""

    def indexed(shard: Shard) -> Shard:
        if shard.index is not None:
            return shard
        hashes, stats = _from_shard(fs, shard, id_column)
        return replace(shard, index=write_index(fs, base, shard.path.rsplit("/", 1)[-1], hashes, stats))

    with ThreadPoolExecutor(READERS) as pool:
        return list(pool.map(indexed, shards))


class DoneIndex:
    """The ids an output holds, as hashes read from its shards' indexes."""

    def __init__(self, fs: pafs.FileSystem, shards: list[Shard], stats: list[dict[str, Any]]) -> None:
        assert all(shard.index for shard in shards), "index the shards first (add_missing_indexes)"
        self.fs = fs
        self.indexes = [shard.index for shard in shards]
        self.rows = sum(item["rows"] for item in stats)

    def _read(self, path: str) -> Hashes:
        table = pq.read_table(path, filesystem=self.fs)
        return Hashes(
            table.column(schema.INDEX_HI).to_numpy().astype(np.uint64, copy=False),
            table.column(schema.INDEX_LO).to_numpy().astype(np.uint64, copy=False),
        )

    def sorted(self, bits: int) -> SortedIds:
        """Every done hash, in parts by the top `bits` (on local disk past one), each part sorted.

        Each index is read once, READERS at a time, so memory holds a batch of indexes and one part.
        """
        sorter = IdSorter(self.rows, split_bits=bits)
        with ThreadPoolExecutor(READERS) as pool:
            for start in range(0, len(self.indexes), READERS):
                for hashes in pool.map(self._read, self.indexes[start : start + READERS]):
                    sorter.add(hashes)
        return sorter.finish()


def done_index(output: str, id_column: str) -> DoneIndex:
    """What the output holds, for resume; shards without an index get one first."""
    fs, base = storage.resolve(output)
    shards = add_missing_indexes(fs, base, list_shards(fs, base), id_column)
    return DoneIndex(fs, shards, read_stats(fs, shards, id_column))
