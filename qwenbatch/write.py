"""Write stage: the row contract's columns, large shards written from the driver as rows finish."""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from qwenbatch import schema, storage
from qwenbatch.answers import Answers
from qwenbatch.config import OutputConfig
from qwenbatch.documents import DocumentGate
from qwenbatch.lease import Lease, LeaseLost
from qwenbatch.retry import RetryPlan
from qwenbatch.shards import merge_stats, write_shard

QUEUED_BATCHES = 8  # blocks waiting for the writer thread before the pipeline waits for it


def finalize_batch(batch: pa.Table, *, model: str, task: str, run_id: str, answers: Answers | None = None) -> pa.Table:
    """Parse JSON answers (`task.output: json`), drop raw bytes and internal columns, give every output column
    its one fixed type."""
    if answers is not None:
        batch = answers(batch)
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


class BlockCounter(Protocol):
    def add(self, batch: pa.Table, inputs: float | None = None) -> None: ...


def inputs_in(batch: pa.Table) -> float:
    """The manifest rows a block of output rows finishes: a PDF's page rows share their document's one."""
    if schema.DOCUMENT_ROWS not in batch.column_names:
        return batch.num_rows
    return sum(1.0 if rows is None else 1.0 / rows for rows in batch.column(schema.DOCUMENT_ROWS).to_pylist())


@dataclass(frozen=True)
class ShardLimits:
    """When a shard is written: at `rows` rows, at `bytes` bytes in memory, or when its first row has
    waited `age(k)` for the k-th shard of the run (counted from 0): no wait for the first, SECOND_SHARD_S
    for the second, twice as long each time after, up to `seconds`."""

    rows: int = schema.DEFAULT_SHARD_ROWS
    bytes: int = schema.DEFAULT_SHARD_MB * 2**20
    seconds: float = schema.DEFAULT_SHARD_SECONDS

    @classmethod
    def of(cls, config: OutputConfig) -> ShardLimits:
        return cls(rows=config.shard_rows, bytes=config.shard_mb * 2**20, seconds=config.shard_seconds)

    def age(self, written: int) -> float:
        return 0.0 if written == 0 else min(self.seconds, schema.SECOND_SHARD_S * 2.0 ** min(written - 1, 32))


class ShardWriter:
    """Takes the job's finished rows on the driver and writes them as large shards, in a thread of its own.

    The pipeline's last operator hands its blocks to `put`; the thread finalizes them, gathers them
    up to the limits and writes each shard with its index (`shards.write_shard`), while the pipeline
    goes on. A crash loses only rows not yet in a shard, which no index lists, so the next run does
    them again; a shard is named by its ids, so one written twice overwrites itself. With a `lease`,
    each shard is written only after renewing it: a run that lost its output writes nothing more. A PDF's
    page rows wait until all of them have come, and go into one shard together (`documents.DocumentGate`).
    """

    def __init__(
        self,
        output: str,
        id_column: str,
        limits: ShardLimits,
        lease: Lease | None = None,
        answers: Answers | None = None,
        counter: BlockCounter | None = None,
        **provenance: str,
    ) -> None:
        self.filesystem, self.base = storage.resolve(output)
        self.counter = counter
        self.id_column = id_column
        self.limits = limits
        self.lease = lease
        self.gate = DocumentGate()
        self.finalize: dict[str, Any] = {"answers": answers, **provenance}
        self.stats: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.queue: queue.Queue[pa.Table | None] = queue.Queue(maxsize=QUEUED_BATCHES)
        self.thread = threading.Thread(target=self._run, name="qwenbatch-shard-writer", daemon=True)
        self.thread.start()

    def put(self, batch: pa.Table) -> None:
        """Blocks while the writer is behind: the pipeline waits rather than piling rows up on the driver."""
        while True:
            if self.error is not None:
                self._raise()
            try:
                self.queue.put(batch, timeout=1.0)
                return
            except queue.Full:
                continue

    def close(self) -> dict[str, Any]:
        """Writes what is left; this run's totals (rows, by status, tokens, shards)."""
        if self.thread.is_alive():
            self.put(None)  # type: ignore[arg-type]  # the end
            self.thread.join()
        if self.error is not None:
            self._raise()
        return merge_stats(self.stats)

    def _raise(self) -> None:
        if isinstance(self.error, LeaseLost):
            raise self.error  # not a failure to write: the output is another run's now
        raise RuntimeError("writing a shard failed") from self.error

    def _run(self) -> None:
        buffer: list[pa.Table] = []
        rows = size = 0
        since = 0.0
        try:
            while True:
                wait = since + self.limits.age(len(self.stats)) - time.monotonic() if buffer else None
                try:
                    batch = self.queue.get(timeout=max(0.0, wait) if wait is not None else None)
                except queue.Empty:
                    batch = pa.table({})  # nothing came in time: the age limit is up
                if batch is None:
                    break
                batch = self.gate.admit(batch) if batch.num_rows else batch
                if batch.num_rows:
                    table = finalize_batch(batch, **self.finalize)
                    if self.counter is not None:  # as written: whole documents, JSON answers parsed
                        self.counter.add(table, inputs_in(batch))
                    since = since if buffer else time.monotonic()
                    buffer.append(table)
                    rows, size = rows + table.num_rows, size + table.nbytes
                due = buffer and (
                    rows >= self.limits.rows
                    or size >= self.limits.bytes
                    or time.monotonic() - since >= self.limits.age(len(self.stats))
                )
                if due:
                    self._write(buffer)
                    buffer, rows, size = [], 0, 0
            self.gate.drop_held()
            if buffer:
                self._write(buffer)
        except BaseException as exc:  # noqa: BLE001 - handed to the pipeline's thread, which raises it
            self.error = exc
            while not self.queue.empty():  # unblock a `put` waiting on a full queue
                self.queue.get_nowait()

    def _write(self, tables: list[pa.Table]) -> None:
        table = pa.concat_tables(tables, promote_options="default")
        renew = self.lease.ensure_held if self.lease is not None else None  # encoded first: renewed at publish
        self.stats.append(write_shard(self.filesystem, self.base, table, self.id_column, renew))


def write_rows(
    dataset: Any,
    output: OutputConfig,
    id_column: str,
    lease: Lease | None = None,
    counter: BlockCounter | None = None,
    answers: Answers | None = None,
    retry: tuple[RetryPlan, str] | None = None,
    **provenance: str,
) -> dict[str, Any]:
    """Every row of the dataset into shards, each block shown to `counter` as it is written; this run's totals.

    With `retry` (a plan and its folder), the rows it retries go to that folder instead (`retry.commit` swaps
    them in once all are written). No dataset: nothing to write, zero totals.
    """
    if dataset is None:
        return merge_stats([])
    options = (id_column, ShardLimits.of(output), lease, answers, counter)
    writer = ShardWriter(output.path, *options, **provenance)
    retried = ShardWriter(retry[1], *options, **provenance) if retry else None
    writers = [writer, *([retried] if retried else [])]
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            if retried is not None:
                routed = pa.array(retry[0].routes(batch, id_column))
                retried.put(batch.filter(routed))
                batch = batch.filter(pc.invert(routed))
            writer.put(batch)
    except BaseException:
        for each in writers:
            each.close()  # the rows that finished are kept
        raise
    return merge_stats([each.close() for each in writers])


def remove_stale_temp(output: str) -> int:
    """Delete temp files a killed writer left behind; readers skip them anyway, this only frees space.

    Runs before any writer of this run starts, under the run's lease: no other run writes there now.
    """
    fs, base = storage.resolve(output)
    if not storage.is_local(fs) or not os.path.isdir(base):
        return 0  # object stores publish whole objects only: they hold no temp files
    folders = [base, os.path.join(base, schema.INDEX_DIR)]
    stale = [
        entry.path
        for folder in folders
        if os.path.isdir(folder)
        for entry in os.scandir(folder)
        if entry.is_file() and entry.name.startswith(schema.TEMP_PREFIX)
    ]
    for path in stale:
        os.remove(path)
    return len(stale)
