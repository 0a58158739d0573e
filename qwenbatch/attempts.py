"""Rows that kill their worker: a ledger of what each actor has in flight, so a retry after a death isolates the row.

Ray Data restarts a dead actor and retries its block without end (`max_restarts=-1`,
`max_task_retries=-1` on its actor pools), so a row that crashes its worker every time (a decoder
segfault, a CUDA fault, the OOM killer) would hang the job. Each call of a load actor or a replica
records its block's row ids under the output (`_attempts/<run_id>/<stage>/`, through `storage`, so
object stores work too) before working on them, and removes the record once done: a call that finds
its block recorded is Ray's retry after a death. It then works on its rows one at a time, each
recorded first and alone in its process, so that a death then is that row's own: a row that killed
its worker twice alone becomes that row's error, never tried a third time, and one that killed it
once (or was only in its block when another row did) gets its normal result.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import pyarrow.fs as pafs
import xxhash

from qwenbatch import schema, storage

log = logging.getLogger(__name__)

K = TypeVar("K")
T = TypeVar("T")


@dataclass(frozen=True)
class AttemptLedger:
    """One stage's records for one run: a file per block or row in flight, named by its ids' hash, counting tries.

    Resolved on the driver like the shard sink, so workers reach object stores with its settings.
    """

    filesystem: pafs.FileSystem
    folder: str

    @classmethod
    def for_run(cls, output: str, run_id: str, stage: str) -> AttemptLedger:
        filesystem, base = storage.resolve(output)
        return cls(filesystem, "/".join((storage.join(base, schema.ATTEMPTS_FOLDER), run_id, stage)))

    def _path(self, kind: str, ids: list[str]) -> str:
        return storage.join(self.folder, f"{kind}-{xxhash.xxh3_128_hexdigest(chr(0).join(ids).encode())}")

    def begin(self, kind: str, ids: list[str]) -> int:
        """Record `ids` as in flight; returns how many times they were before: the deaths of workers on them."""
        path = self._path(kind, ids)
        before = 0
        if storage.exists(self.filesystem, path):
            with self.filesystem.open_input_stream(path) as handle:
                before = int(handle.read())
        storage.write_bytes_atomic(self.filesystem, path, str(before + 1).encode())
        return before

    def end(self, kind: str, ids: list[str]) -> None:
        self.filesystem.delete_file(self._path(kind, ids))


def remove_all(output: str) -> None:
    """Every run's records, at the end of a run: this one's are spent, and those of runs killed before it stale."""
    filesystem, base = storage.resolve(output)
    folder = storage.join(base, schema.ATTEMPTS_FOLDER)
    if storage.exists(filesystem, folder):
        filesystem.delete_dir(folder)


class _Turns:
    """Blocks share the process; an isolated row has it alone, so that a death while it runs is its own."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._shared = 0
        self._alone = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._alone)
            self._shared += 1
        try:
            yield
        finally:
            with self._condition:
                self._shared -= 1
                self._condition.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._alone)
            self._alone = True
            self._condition.wait_for(lambda: self._shared == 0)
        try:
            yield
        finally:
            with self._condition:
                self._alone = False
                self._condition.notify_all()


@dataclass
class Guard:
    """Runs an actor's calls under its ledger; without one (a stage called directly, in tests) it only runs them."""

    ledger: AttemptLedger | None
    stage: str
    _turns: _Turns = field(default_factory=_Turns)

    def run(
        self, keys: list[K], ids: list[str], work: Callable[[list[K]], dict[K, T]], died: Callable[[], T]
    ) -> dict[K, T]:
        """`work(keys)` gives each of those rows' result; `died()` the result of a row that killed its worker twice."""
        if self.ledger is None or not keys:
            return work(keys)
        if self.ledger.begin("block", ids) == 0:
            with self._turns.shared():
                results = work(keys)
            self.ledger.end("block", ids)
            return results
        log.warning("%s: a worker died on a block of %d rows; retrying them one at a time", self.stage, len(keys))
        results = {}
        for key, row in zip(keys, ids, strict=True):
            with self._turns.alone():
                if self.ledger.begin("row", [row]) >= schema.ROW_WORKER_DEATHS:
                    log.warning("%s: row %r killed its worker twice; not trying it again", self.stage, row)
                    results[key] = died()
                    continue  # its record stays: a later retry of the block finds it too
                results.update(work([key]))
                self.ledger.end("row", [row])
        self.ledger.end("block", ids)
        return results


def die_if_told(stage: str, ids: Iterable[str]) -> None:
    """Test hook: a real worker death (SIGSEGV, as from a crashing decoder) on the rows `QWENBATCH_TEST_DIE_ON` names.

    Its entries are `<stage>:<id>` (dies every time) or `<stage>:<id>:<marker file>` (dies once: the
    file, created first, says it did). Set only by the tests, in the environment of the job they run.
    """
    spec = os.environ.get(schema.TEST_DIE_ENV)
    if not spec:
        return
    ids = set(ids)
    for entry in spec.split(","):
        where, row, *marker = entry.split(":", 2)
        if where != stage or row not in ids:
            continue
        if marker:
            try:
                open(marker[0], "x").close()
            except FileExistsError:
                continue
        # To this thread: delivered before the call returns, so no later row is recorded as in flight.
        signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)
