"""What every input kind becomes before any work: its files, their rows, and its ids checked.

Ids key resume and exactly-once output, so null, empty or repeated ids stop the job before it
starts. The check reads ids chunk by chunk and keeps their hashes (`ids.py`), in parts on local disk
past `schema.ID_PART_ROWS`, so a 100M-row manifest is checked in bounded memory; the same sorted
hashes then find the rows the output does not hold yet (`find_todo`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qwenbatch.ids import IdSorter, SortedIds, hash_ids, part_bits, part_range, repeated

DUPLICATE_EXAMPLES = 5


class ManifestError(ValueError):
    """The manifest as a whole cannot be processed: a job-level error before any work."""


@dataclass(frozen=True)
class Manifest:
    """The input: its files (manifests, tars or Arrow files), the rows in each, and their ids' hashes."""

    filesystem: Any
    files: list[str]
    columns: list[str]
    file_groups: tuple[tuple[int, ...], ...]  # rows per Parquet row group of each file; one group per tar or Arrow file
    ids: SortedIds  # every id's hash and row number (rows counted across files, in order)
    roots: tuple[str, ...] = ()  # the folders `qwenbatch manifest` walked to write these manifests

    @property
    def file_rows(self) -> tuple[int, ...]:
        return tuple(sum(groups) for groups in self.file_groups)

    @property
    def rows(self) -> int:
        return sum(sum(groups) for groups in self.file_groups)


class IdCheck:
    """Checks ids as they are read, chunk by chunk: none null or empty, none repeated.

    Rows are numbered in the order the chunks come, across the whole input.
    """

    def __init__(self, column: str, expected_rows: int, part_rows: int | None = None) -> None:
        self.column = column
        self.missing = 0
        self.sorter = IdSorter(expected_rows, part_rows)

    def add(self, ids: pa.Array | pa.ChunkedArray) -> None:
        text = pc.cast(ids, pa.string())
        self.missing += text.null_count + (pc.sum(pc.equal(pc.utf8_trim_whitespace(text), "")).as_py() or 0)
        self.sorter.add(hash_ids(text))

    def finish(self, fetch: Callable[[np.ndarray], Sequence[Any]]) -> SortedIds:
        """The sorted hashes; a ManifestError when an id is null, empty or repeated.

        `fetch` gives the ids at some row numbers, for the message's examples.
        """
        sorted_ids = self.sorter.finish()
        if self.missing:
            sorted_ids.close()
            raise ManifestError(
                f"{self.missing} rows have a null or empty {self.column!r}; every row needs a unique id"
            )
        count, firsts = 0, []
        for _, part in sorted_ids:
            found, rows = repeated(part)
            count += found
            firsts = sorted([*firsts, *rows.tolist()])[:DUPLICATE_EXAMPLES]
        if count:
            sorted_ids.close()
            examples = ", ".join(repr(str(v)) for v in fetch(np.array(firsts, np.int64)))
            raise ManifestError(f"{count} ids appear more than once in {self.column!r}, e.g. {examples}")
        return sorted_ids


def check_ids(ids: pa.Array | pa.ChunkedArray, column: str) -> SortedIds:
    """The check of one array of ids held in memory."""
    check = IdCheck(column, len(ids))
    check.add(ids)
    return check.finish(lambda rows: pc.cast(ids, pa.string()).take(pa.array(rows)).to_pylist())


class DoneIds(Protocol):
    """The ids an output holds (`shards.DoneIndex`): how many, and their hashes sorted in parts."""

    rows: int

    def sorted(self, bits: int) -> SortedIds: ...


@dataclass(frozen=True)
class Todo:
    """The rows left to process, per input file: every row, none, or a mask."""

    rows: int
    keep: tuple[np.ndarray | None, ...]  # per file: None for every row, else a bool mask of its rows


def find_todo(manifest: Manifest, done: DoneIds, redo: DoneIds | None = None) -> Todo:
    """Rows of the manifest whose ids the output does not hold, or that `redo` names (a retry's errors).

    One part of the hash range at a time, the parts as fine as the larger set needs, so neither set is
    ever whole in memory.
    """
    todo = np.ones(manifest.rows, bool)
    _mark(manifest, done, todo, False)
    if redo is not None:
        _mark(manifest, redo, todo, True)
    manifest.ids.close()
    keep: list[np.ndarray | None] = []
    start = 0
    for rows in manifest.file_rows:
        mask = todo[start : start + rows]
        keep.append(None if mask.all() else mask.copy())
        start += rows
    return Todo(rows=int(todo.sum()), keep=tuple(keep))


def _mark(manifest: Manifest, found: DoneIds, todo: np.ndarray, value: bool) -> None:
    """Set `todo` to `value` on the manifest rows whose ids `found` holds."""
    if not found.rows:
        return
    bits = max(manifest.ids.bits, part_bits(found.rows))
    have = found.sorted(bits)
    split = 2 ** (bits - manifest.ids.bits)  # found parts per manifest part
    for index, part in manifest.ids:
        for sub in range(split):
            low, high = part_range(index * split + sub, bits)
            first = np.searchsorted(part.hashes.hi, np.uint64(low), side="left")
            keys = part.slice(first, np.searchsorted(part.hashes.hi, np.uint64(high), side="right"))
            if len(keys):
                todo[keys.row[have.part(index * split + sub).hashes.contains(keys.hashes)]] = value
    have.close()
