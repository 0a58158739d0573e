"""Replica busy time: where each model replica's wall time went, and how busy the run kept its GPUs.

Each replica counts the seconds it spends inside `generate`, preparing batches (processor, pinned
memory, copies to the device; overlapped with `generate`) and waiting for rows (no batch in hand),
from the start of its first `generate` to the end of its last, and writes them to one small JSON
file under the output after every batch: `qwenbatch status` reads them while the run goes, and the
run's summary folds them into `gpu_busy` at the end. That figure tells a user whether to add CPUs
(the GPU waits) or GPUs. The time before a replica's first `generate`, from its first block of rows
(`fill_s`: its first batch prepared with nothing to overlap), is kept apart: once per replica, it
says nothing of how a long run keeps its GPU fed.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pyarrow.fs as pafs

from qwenbatch import schema, storage


@dataclass
class ReplicaTime:
    """One replica's figures; times are seconds, `started`/`ended` wall-clock epoch seconds."""

    replica: str
    host: str
    pid: int
    device: str
    started: float | None = None  # its first generate began
    ended: float | None = None  # its latest generate ended
    first_block: float | None = None  # its first block of rows arrived
    calls: int = 0  # blocks of rows Ray Data handed it
    batches: int = 0  # generate calls
    rows: int = 0
    generate_s: float = 0.0
    prepare_s: float = 0.0
    wait_s: float = 0.0
    peak_memory_bytes: int = 0  # on a GPU: the most device memory torch held at once
    # The vLLM engine's occupancy, from its scheduler's figures for each step (zero for the transformers engine).
    in_flight_target: int = 0  # requests the replica keeps in the engine, running or queued
    steps: int = 0
    running_sum: int = 0  # requests running, summed over the steps
    running_max: int = 0
    waiting_sum: int = 0  # requests queued in the engine, not yet running, summed over the steps
    starved_steps: int = 0  # steps run under the target while rows waited in the replica to be added
    kv_cache_peak: float = 0.0  # the largest share of the KV cache in use after a step
    filled_steps: int = 0  # steps from the first with the target in the engine to the last
    filled_running_sum: int = 0
    filled_waiting_sum: int = 0

    @property
    def span_s(self) -> float:
        return (self.ended - self.started) if self.started is not None and self.ended is not None else 0.0

    @property
    def busy(self) -> float | None:
        return round(self.generate_s / self.span_s, 4) if self.span_s > 0 else None

    @property
    def fill_s(self) -> float | None:
        """From the first block in hand to the first generate: the first batch prepared with nothing to overlap."""
        return round(self.started - self.first_block, 3) if None not in (self.started, self.first_block) else None

    def occupancy(self) -> dict[str, Any]:
        """Mean running requests per step, overall and once filled; the share of starved steps."""
        return {
            "running_mean": _ratio(self.running_sum, self.steps, 2),
            "filled_running_mean": _ratio(self.filled_running_sum, self.filled_steps, 2),
            "in_engine_mean": _ratio(self.running_sum + self.waiting_sum, self.steps, 2),  # running and queued
            "filled_in_engine_mean": _ratio(self.filled_running_sum + self.filled_waiting_sum, self.filled_steps, 2),
            "starved": _ratio(self.starved_steps, self.steps, 4),
        }

    def as_dict(self) -> dict[str, Any]:
        derived = {"span_s": round(self.span_s, 3), "busy": self.busy, "fill_s": self.fill_s}
        return asdict(self) | derived | self.occupancy()


KNOWN = {f.name for f in fields(ReplicaTime)}


def _ratio(part: float, whole: float, digits: int) -> float | None:
    return round(part / whole, digits) if whole else None


@dataclass
class ReplicaClock:
    """Accumulates a replica's `ReplicaTime`; safe to call from its generate and prepare threads.

    Two blocks of rows may be in the replica at once (one prepares while the other generates), so
    "waiting for rows" is the time with no block in hand at all.
    """

    figures: ReplicaTime
    _active: int = 0
    _idle_since: float | None = None
    _filling: tuple[int, int, int] | None = None  # steps, running and queued requests since the target was first held
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def start(cls, device: str) -> ReplicaClock:
        replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        return cls(ReplicaTime(replica, socket.gethostname(), os.getpid(), device))

    def call_started(self, rows: int) -> None:
        now = time.time()
        with self._lock:
            if self.figures.first_block is None:
                self.figures.first_block = now
            elif self._active == 0 and self._idle_since is not None:
                self.figures.wait_s += now - self._idle_since
            self._active += 1
            self.figures.calls += 1
            self.figures.rows += rows

    def call_ended(self) -> ReplicaTime:
        """Close a block; returns a snapshot to publish."""
        now = time.time()
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self._idle_since = now
            return ReplicaTime(**asdict(self.figures))

    def add(
        self,
        *,
        generate_s: float = 0.0,
        prepare_s: float = 0.0,
        batches: int = 0,
        memory: int = 0,
        began: float | None = None,
    ) -> None:
        """`began`: the wall-clock time a `generate` of `generate_s` seconds started."""
        with self._lock:
            if began is not None:
                self.figures.started = began if self.figures.started is None else self.figures.started
                self.figures.ended = began + generate_s
            self.figures.generate_s += generate_s
            self.figures.prepare_s += prepare_s
            self.figures.batches += batches
            self.figures.peak_memory_bytes = max(self.figures.peak_memory_bytes, memory)

    def step(self, running: int, kv_cache: float, starved: bool, full: bool, waiting: int = 0) -> None:
        """One engine step of the vLLM engine: its running requests and KV cache share (its scheduler's figures),
        whether rows waited in the replica while the engine held fewer than its target, and whether it held it."""
        with self._lock:
            f = self.figures
            f.steps += 1
            f.running_sum += running
            f.running_max = max(f.running_max, running)
            f.waiting_sum += waiting
            f.starved_steps += starved
            f.kv_cache_peak = max(f.kv_cache_peak, round(kv_cache, 4))
            if full or self._filling is not None:
                steps, total, queued = self._filling or (0, 0, 0)
                self._filling = (steps + 1, total + running, queued + waiting)
                if full:  # the figures run to the last step that held the target: the final drain is left out
                    f.filled_steps, f.filled_running_sum, f.filled_waiting_sum = self._filling


@dataclass(frozen=True)
class TimingSink:
    """Where a run's replicas publish their figures: `<output>/_replicas/<run_id>/<replica>.json`.

    Resolved on the driver like the shard sink, so workers reach object stores with its settings.
    """

    filesystem: pafs.FileSystem
    folder: str

    @classmethod
    def for_run(cls, output: str, run_id: str) -> TimingSink:
        filesystem, base = storage.resolve(output)
        return cls(filesystem, storage.join(storage.join(base, schema.REPLICAS_FOLDER), run_id))

    def publish(self, figures: ReplicaTime) -> None:
        path = storage.join(self.folder, f"{figures.replica}.json")
        storage.write_bytes_atomic(self.filesystem, path, json.dumps(figures.as_dict()).encode())

    def read(self) -> list[ReplicaTime]:
        return _read_figures(self.filesystem, self.folder)

    def remove_all(self) -> None:
        """Every run's figures: this one's are in its summary, and those of runs killed before it are stale."""
        every_run = self.folder.rsplit("/", 1)[0]
        if storage.exists(self.filesystem, every_run):
            self.filesystem.delete_dir(every_run)


def _read_figures(filesystem: pafs.FileSystem, folder: str) -> list[ReplicaTime]:
    replicas = []
    for entry in storage.list_files(filesystem, folder, (".json",)):
        with filesystem.open_input_stream(entry.path) as handle:
            data = json.loads(handle.read())
        replicas.append(ReplicaTime(**{k: v for k, v in data.items() if k in KNOWN}))  # a newer replica's extras go
    return replicas


def live_figures(output: str) -> tuple[str, list[ReplicaTime]] | None:
    """The replicas of the run writing `output` now (its newest run folder), or None between runs."""
    filesystem, base = storage.resolve(output)
    folder = storage.join(base, schema.REPLICAS_FOLDER)
    runs = storage.list_folders(filesystem, folder)
    if not runs:
        return None
    newest = max(runs)  # run ids start with their UTC start time
    return newest.rsplit("/", 1)[-1], _read_figures(filesystem, newest)


def concurrent_replicas(replicas: list[ReplicaTime]) -> int:
    """The most replicas working at one moment: a replica Ray restarted counts once, not twice."""
    events = sorted(
        [(r.started, 1) for r in replicas if r.span_s > 0] + [(r.ended, -1) for r in replicas if r.span_s > 0],
        key=lambda event: (event[0], event[1]),
    )
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def on_cpu(busy: dict[str, Any]) -> bool:
    """Whether every replica of a `busy_summary` ran on the CPU: its busy share then says nothing of GPUs,
    and more CPUs per GPU is no advice to give."""
    each = (busy.get("replicas") or {}).get("each") or []
    return bool(each) and all(replica.get("device") == "cpu" for replica in each)


def busy_summary(replicas: list[ReplicaTime]) -> dict[str, Any]:
    """`gpu_busy`: time in `generate` over replicas x the wall time from the first `generate` to the last.

    Returns the summary's `gpu_busy` and `replicas` entries; `replicas.each` has one figure set per
    replica process (a replica Ray restarted appears twice, and counts once in `replicas.count`).
    """
    working = [r for r in replicas if r.span_s > 0]
    each = [r.as_dict() for r in sorted(replicas, key=lambda r: r.started or 0.0)]
    if not working:
        return {"gpu_busy": None, "replicas": {"count": 0, "each": each}}
    window = max(r.ended for r in working) - min(r.started for r in working)  # type: ignore[type-var]
    count = concurrent_replicas(working)
    generate = sum(r.generate_s for r in working)
    return {
        "gpu_busy": round(generate / (count * window), 4) if window > 0 else None,
        "replicas": {
            "count": count,
            "window_s": round(window, 3),
            "generate_s": round(generate, 3),
            "prepare_s": round(sum(r.prepare_s for r in working), 3),
            "wait_s": round(sum(r.wait_s for r in working), 3),
            "fill_s": max((r.fill_s for r in working if r.fill_s is not None), default=None),
            **({"engine": engine_occupancy(working)} if any(r.steps for r in working) else {}),
            "each": each,
        },
    }


def engine_occupancy(replicas: list[ReplicaTime]) -> dict[str, Any]:
    """The vLLM engine's occupancy over all replicas: figures per step, each replica's steps counted once."""
    total = ReplicaTime("all", "", 0, "")
    for r in replicas:
        total.steps += r.steps
        total.running_sum += r.running_sum
        total.waiting_sum += r.waiting_sum
        total.filled_waiting_sum += r.filled_waiting_sum
        total.starved_steps += r.starved_steps
        total.filled_steps += r.filled_steps
        total.filled_running_sum += r.filled_running_sum
    return {
        "in_flight_target": max(r.in_flight_target for r in replicas),
        "steps": total.steps,
        "running_max": max(r.running_max for r in replicas),
        "kv_cache_peak": max(r.kv_cache_peak for r in replicas),
    } | total.occupancy()
