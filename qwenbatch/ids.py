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
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from qwenbatch import schema

ROW_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("row", "<i8")])


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

    @classmethod
    def concat(cls, parts: list[Hashes]) -> Hashes:
        if not parts:
            return cls.empty()
        return cls(np.concatenate([p.hi for p in parts]), np.concatenate([p.lo for p in parts]))

    def sorted(self) -> Hashes:
        order = np.lexsort((self.lo, self.hi))
        return Hashes(self.hi[order], self.lo[order])

    def contains(self, keys: Hashes) -> np.ndarray:
        """For each key, whether this (sorted) set holds it."""
        left = np.searchsorted(self.hi, keys.hi, "left")
        right = np.searchsorted(self.hi, keys.hi, "right")
        found = np.zeros(len(keys), bool)
        single = np.flatnonzero(right - left == 1)
        found[single] = self.lo[left[single]] == keys.lo[single]
        for index in np.flatnonzero(right - left > 1):  # distinct ids sharing 64 bits: next to never
            found[index] = keys.lo[index] in self.lo[left[index] : right[index]]
        return found


def hash_ids(ids: pa.Array | pa.ChunkedArray) -> Hashes:
    """The hash of each id, as text (a null hashes as the empty string: the manifest check refuses both)."""
    chunks = ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]
    digests: list[bytes] = []
    for chunk in chunks:
        text = pc.cast(chunk, pa.large_string())
        if not len(text):
            continue
        offsets = np.frombuffer(text.buffers()[1], np.int64, len(text) + 1, text.offset * 8).tolist()
        data = text.buffers()[2]
        view = memoryview(data) if data is not None else memoryview(b"")
        hash128 = xxhash.xxh3_128_digest
        digests.extend(hash128(view[start:end]) for start, end in zip(offsets[:-1], offsets[1:], strict=True))
    if not digests:
        return Hashes.empty()
    words = np.frombuffer(b"".join(digests), "<u8").reshape(-1, 2)
    return Hashes(words[:, 0].copy(), words[:, 1].copy())


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


@dataclass
class SortedIds:
    """Hashes with their row numbers, in parts by the top `bits` of `hi`, each sorted by (hi, lo).

    With one part it stays in memory; with more, each part is a file in `folder`, read one at a time.
    """

    bits: int
    folder: str | None = None
    memory: np.ndarray | None = None
    rows: int = 0

    @property
    def parts(self) -> int:
        return 2**self.bits

    def part(self, index: int) -> np.ndarray:
        if self.folder is None:
            assert self.memory is not None
            return self.memory
        path = os.path.join(self.folder, f"sorted-{index:05d}.npy")
        return np.load(path) if os.path.exists(path) else np.empty(0, ROW_DTYPE)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        for index in range(self.parts):
            yield index, self.part(index)

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        self.memory = None


@dataclass
class IdSorter:
    """Takes hashes chunk by chunk, numbering rows in the order they come; `finish` sorts each part."""

    expected_rows: int
    part_rows: int | None = None  # default: schema.ID_PART_ROWS
    bits: int = field(init=False)
    folder: str | None = field(init=False, default=None)
    pieces: list[np.ndarray] = field(init=False, default_factory=list)
    rows: int = field(init=False, default=0)
    spilled: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.bits = part_bits(self.expected_rows, self.part_rows)
        if self.bits:
            self.folder = tempfile.mkdtemp(prefix="qwenbatch-ids-")

    def add(self, hashes: Hashes) -> None:
        records = np.empty(len(hashes), ROW_DTYPE)
        records["hi"], records["lo"] = hashes.hi, hashes.lo
        records["row"] = np.arange(self.rows, self.rows + len(hashes))
        self.rows += len(hashes)
        if self.folder is None:
            self.pieces.append(records)
            return
        parts = records["hi"] >> np.uint64(64 - self.bits)
        order = np.argsort(parts, kind="stable")
        bounds = np.searchsorted(parts[order], np.arange(2**self.bits + 1))
        for index in range(2**self.bits):
            chunk = records[order[bounds[index] : bounds[index + 1]]]
            if len(chunk):
                np.save(os.path.join(self.folder, f"piece-{index:05d}-{self.spilled:06d}.npy"), chunk)
        self.spilled += 1

    def finish(self) -> SortedIds:
        if self.folder is None:
            records = np.concatenate(self.pieces) if self.pieces else np.empty(0, ROW_DTYPE)
            self.pieces = []
            return SortedIds(0, memory=records[np.lexsort((records["lo"], records["hi"]))], rows=self.rows)
        names = sorted(os.listdir(self.folder))
        for index in range(2**self.bits):
            mine = [n for n in names if n.startswith(f"piece-{index:05d}-")]
            if not mine:
                continue
            records = np.concatenate([np.load(os.path.join(self.folder, n)) for n in mine])
            np.save(
                os.path.join(self.folder, f"sorted-{index:05d}.npy"),
                records[np.lexsort((records["lo"], records["hi"]))],
            )
            for name in mine:
                os.remove(os.path.join(self.folder, name))
        return SortedIds(self.bits, folder=self.folder, rows=self.rows)


def repeated(records: np.ndarray) -> tuple[int, np.ndarray]:
    """In sorted records: how many distinct hashes occur more than once, and the first row of each."""
    if len(records) < 2:
        return 0, np.empty(0, np.int64)
    same = (records["hi"][1:] == records["hi"][:-1]) & (records["lo"][1:] == records["lo"][:-1])
    if not same.any():
        return 0, np.empty(0, np.int64)
    edges = np.diff(np.concatenate([[0], same.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) + 1  # runs of equal records
    bounds = np.column_stack([starts, ends]).ravel()
    bounds = bounds[:-1] if bounds[-1] == len(records) else bounds
    return len(starts), np.minimum.reduceat(records["row"], bounds)[::2]  # each run's smallest row
