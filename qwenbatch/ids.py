"""Ids as 128-bit hashes, sorted in parts: how resume and the duplicate check compare millions of ids.

An id's hash is XXH3-128 of its UTF-8 bytes (a frozen, documented algorithm), kept as two uint64
words (`hi` sorts first). Two different ids share a hash with a probability of about 2^-128 per
pair: 3e-23 for 100M manifest ids against 100M done ones. Sorted hash arrays take 16 bytes an id
whatever its length, and membership is a binary search.

A set too large for one process's memory is split by the top bits of `hi` into parts of at most
`schema.ID_PART_ROWS` ids each, kept on local disk until sorted one at a time: memory holds one part.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from qwenbatch import schema

HASH_SLICE = 65_536  # ids turned into Python bytes at once, to be hashed
SPILL_ROWS = 1 << 20  # hashes gathered in memory before they go to disk, split by part


def sort_order(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """The order that sorts by (hi, lo): by `hi` alone (twice as fast), unless two share a `hi`."""
    order = np.argsort(hi, kind="stable")
    ordered = hi[order]
    if len(ordered) > 1 and (ordered[1:] == ordered[:-1]).any():  # repeated ids, or 64-bit twins
        order = np.lexsort((lo, hi))
    return order


@dataclass(frozen=True)
class Hashes:
    """Id hashes, `hi` and `lo` words side by side; sorted by (hi, lo) wherever a set is searched."""

    hi: np.ndarray
    lo: np.ndarray

    def __len__(self) -> int:
        return len(self.hi)

    @classmethod
    def empty(cls) -> Hashes:
        return cls(np.empty(0, np.uint64), np.empty(0, np.uint64))

    def sorted(self) -> Hashes:
        order = sort_order(self.hi, self.lo)
        return Hashes(self.hi[order], self.lo[order])

    def contains(self, keys: Hashes) -> np.ndarray:
        """For each key, whether this set (sorted) holds it; fastest when the keys are sorted too."""
        left = np.searchsorted(self.hi, keys.hi, "left")
        right = np.searchsorted(self.hi, keys.hi, "right")
        found = np.zeros(len(keys), bool)
        single = np.flatnonzero(right - left == 1)
        found[single] = self.lo[left[single]] == keys.lo[single]
        for index in np.flatnonzero(right - left > 1):  # distinct ids sharing 64 bits: next to never
            found[index] = keys.lo[index] in self.lo[left[index] : right[index]]
        return found


def hash_ids(ids: pa.Array | pa.ChunkedArray) -> Hashes:
    """The hash of each id, as text (a null hashes as the empty string: the manifest check refuses both).

    A slice at a time: the ids become Python bytes only HASH_SLICE at once.
    """
    text = pc.cast(ids, pa.string())
    hi, lo = np.empty(len(text), np.uint64), np.empty(len(text), np.uint64)
    for start in range(0, len(text), HASH_SLICE):
        values = pc.cast(text.slice(start, HASH_SLICE), pa.binary()).to_pylist()
        digests = b"".join([xxhash.xxh3_128_digest(value or b"") for value in values])
        words = np.frombuffer(digests, "<u8").reshape(-1, 2)
        hi[start : start + len(values)], lo[start : start + len(values)] = words[:, 0], words[:, 1]
    return Hashes(hi, lo)


def part_bits(rows: int, part_rows: int | None = None) -> int:
    """How many top bits of `hi` split `rows` ids into parts of at most about `part_rows`."""
    part_rows = part_rows or schema.ID_PART_ROWS
    return max(0, math.ceil(math.log2(rows / part_rows))) if rows > part_rows else 0


def part_range(part: int, bits: int) -> tuple[int, int]:
    """The `hi` values of one part: [low, high], inclusive."""
    if bits == 0:
        return 0, 2**64 - 1
    width = 2 ** (64 - bits)
    return part * width, (part + 1) * width - 1


@dataclass(frozen=True)
class Part:
    """Hashes sorted by (hi, lo), with the row number of each."""

    hashes: Hashes
    row: np.ndarray

    def __len__(self) -> int:
        return len(self.row)

    def slice(self, start: int, stop: int) -> Part:
        return Part(Hashes(self.hashes.hi[start:stop], self.hashes.lo[start:stop]), self.row[start:stop])

    @classmethod
    def empty(cls) -> Part:
        return cls(Hashes.empty(), np.empty(0, np.int64))

    @classmethod
    def sorted_from(cls, columns: dict[str, np.ndarray]) -> Part:
        """From the columns `hi`, `lo` and `row`, which it takes over (and sorts one at a time)."""
        order = sort_order(columns["hi"], columns["lo"])
        for name in ("hi", "lo", "row"):
            columns[name] = columns[name][order]
        return cls(Hashes(columns["hi"], columns["lo"]), columns["row"])


class SpillFolder:
    """A temp folder of id parts: removed when closed, when nothing holds it any more, or when the
    process exits, so a run that stops between the id check and its use of the ids (an error, a
    held lease) leaves no gigabytes behind. Only a killed process does."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="qwenbatch-ids-")
        self.remove = weakref.finalize(self, shutil.rmtree, self.path, True)

    def join(self, name: str) -> str:
        return os.path.join(self.path, name)


@dataclass
class SortedIds:
    """Hashes with their row numbers, in parts by the top `bits` of `hi`, each sorted by (hi, lo).

    With one part it stays in memory; with more, each part is a file in `folder`, read one at a time.
    """

    bits: int
    folder: SpillFolder | None = None
    memory: Part | None = None
    rows: int = 0
    closed: bool = False

    @property
    def parts(self) -> int:
        return 2**self.bits

    def part(self, index: int) -> Part:
        if self.closed:
            raise RuntimeError("these sorted ids were used up and their parts removed")
        if self.folder is None:
            return self.memory or Part.empty()
        path = self.folder.join(f"sorted-{index:05d}.npz")
        if not os.path.exists(path):
            return Part.empty()
        with np.load(path) as saved:
            return Part(Hashes(saved["hi"], saved["lo"]), saved["row"])

    def __iter__(self) -> Iterator[tuple[int, Part]]:
        for index in range(self.parts):
            yield index, self.part(index)

    def close(self) -> None:
        """Free the memory or disk the parts take; the parts are gone after."""
        if self.folder is not None:
            self.folder.remove()
            self.folder = None
        self.memory = None
        self.closed = True


@dataclass
class IdSorter:
    """Takes hashes chunk by chunk, numbering rows in the order they come; `finish` sorts each part."""

    expected_rows: int
    part_rows: int | None = None  # default: schema.ID_PART_ROWS
    split_bits: int | None = None  # the parts by these top bits, whatever the rows
    bits: int = field(init=False)
    folder: SpillFolder | None = field(init=False, default=None)
    pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(init=False, default_factory=list)
    rows: int = field(init=False, default=0)
    buffered: int = field(init=False, default=0)
    spilled: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.bits = part_bits(self.expected_rows, self.part_rows) if self.split_bits is None else self.split_bits
        if self.bits:
            self.folder = SpillFolder()

    def add(self, hashes: Hashes) -> None:
        row = np.arange(self.rows, self.rows + len(hashes), dtype=np.int64)
        self.rows += len(hashes)
        self.pieces.append((hashes.hi, hashes.lo, row))
        self.buffered += len(hashes)
        if self.folder is not None and self.buffered >= SPILL_ROWS:
            self._spill()

    def _spill(self) -> None:
        """The buffered pieces to disk: one file per part."""
        hi, lo, row = (np.concatenate([p[i] for p in self.pieces]) for i in range(3))
        self.pieces, self.buffered = [], 0
        parts = hi >> np.uint64(64 - self.bits)
        order = np.argsort(parts, kind="stable")
        bounds = np.searchsorted(parts[order], np.arange(2**self.bits + 1))
        for index in range(2**self.bits):
            take = order[bounds[index] : bounds[index + 1]]
            if len(take):
                path = self.folder.join(f"piece-{index:05d}-{self.spilled:06d}.npz")
                np.savez(path, hi=hi[take], lo=lo[take], row=row[take])
        self.spilled += 1

    def finish(self) -> SortedIds:
        if self.folder is None:
            pieces, self.pieces = self.pieces, []
            if not pieces:
                return SortedIds(0, memory=Part.empty(), rows=self.rows)
            columns = {name: np.concatenate([p[i] for p in pieces]) for i, name in enumerate(("hi", "lo", "row"))}
            del pieces
            return SortedIds(0, memory=Part.sorted_from(columns), rows=self.rows)
        if self.pieces:
            self._spill()
        names = sorted(os.listdir(self.folder.path))
        for index in range(2**self.bits):
            mine = [self.folder.join(n) for n in names if n.startswith(f"piece-{index:05d}-")]
            if not mine:
                continue
            columns = {}
            for name in ("hi", "lo", "row"):  # a column at a time: memory holds the part and one copy at most
                columns[name] = np.concatenate([np.load(path)[name] for path in mine])
            part = Part.sorted_from(columns)
            for path in mine:
                os.remove(path)
            path = self.folder.join(f"sorted-{index:05d}.npz")
            np.savez(path, hi=part.hashes.hi, lo=part.hashes.lo, row=part.row)
        return SortedIds(self.bits, folder=self.folder, rows=self.rows)


def repeated(part: Part) -> tuple[int, np.ndarray]:
    """In a sorted part: how many distinct hashes occur more than once, and the first row of each."""
    hi, lo = part.hashes.hi, part.hashes.lo
    if len(hi) < 2:
        return 0, np.empty(0, np.int64)
    same = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
    if not same.any():
        return 0, np.empty(0, np.int64)
    edges = np.diff(np.concatenate([[0], same.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) + 1  # runs of equal hashes
    bounds = np.column_stack([starts, ends]).ravel()
    bounds = bounds[:-1] if bounds[-1] == len(hi) else bounds
    return len(starts), np.minimum.reduceat(part.row, bounds)[::2]  # each run's smallest row
