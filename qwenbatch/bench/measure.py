"""What a benchmark run measured: time, rate after the first output, memory, CPU, GPU busy and MFU."""

from __future__ import annotations

import bisect
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Measure:
    name: str
    images: int
    seconds: float
    output_tokens: int
    input_tokens: int
    peak_memory_bytes: int
    first_output_s: float  # from the start to the first finished rows: model loading and, on Ray, worker startup
    first_output_rows: int
    gpu_busy: float | None = None  # qwenbatch runs: time in generate over the replica's first-to-last batch
    mfu: float | None = None  # GPU: model FLOPs of the rows after the first output over that time, at peak
    cpu_s_per_image: float | None = None  # busy CPU seconds of the whole machine over the run, per image
    ideal_images_per_s: float | None = None  # qwenbatch runs: images over the time spent in generate alone
    busy_window_images_per_s: float | None = None  # images over the first-to-last batch window
    prepare_ms_per_image: float | None = None  # the replica's processor and copies (overlapped), per image
    window_cores: float | None = None  # CPU cores the machine kept busy, on average, over the busy window
    engine: dict[str, Any] | None = None  # the vLLM engine's occupancy (summary `replicas.engine`): requests per step

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def after_first_images_per_s(self) -> float | None:
        """The rate once the first rows are out: what a run over millions of images settles at."""
        rest = self.seconds - self.first_output_s
        return (self.images - self.first_output_rows) / rest if rest > 0 else None

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def row(self) -> dict[str, Any]:
        after = self.after_first_images_per_s
        return asdict(self) | {
            "images_per_s": round(self.images_per_s, 3),
            "output_tokens_per_s": round(self.output_tokens_per_s, 1),
            "after_first_images_per_s": None if after is None else round(after, 3),
        }


class PeakRSS:
    """Samples the summed resident memory of this process and its Ray workers on this machine."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *psutil.process_iter(["name", "cmdline"])]:
                try:
                    is_worker = proc.pid != me.pid and "ray::" in (proc.info.get("name") or "") + " ".join(
                        proc.info.get("cmdline") or []
                    )
                    if proc.pid == me.pid or is_worker:
                        total += proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class CpuSeconds:
    """Busy CPU seconds of the whole machine while the block runs: the job's processes and Ray's own.

    Read from the kernel's counters, so work in processes that end before the block does counts too;
    sampled as it goes, so `between` gives the seconds spent within a part of the block.
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []  # (wall clock, busy CPU seconds so far)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self._busy()))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> CpuSeconds:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time(), self._busy()))

    @property
    def seconds(self) -> float:
        return self.samples[-1][1] - self.samples[0][1]

    def between(self, start: float, end: float) -> float:
        """Busy CPU seconds between two wall-clock times, interpolated between samples."""
        times = [t for t, _ in self.samples]

        def at(moment: float) -> float:
            index = min(max(bisect.bisect_left(times, moment), 1), len(times) - 1)
            (t0, b0), (t1, b1) = self.samples[index - 1], self.samples[index]
            return b0 + (b1 - b0) * min(max((moment - t0) / (t1 - t0), 0.0), 1.0) if t1 > t0 else b1

        return at(end) - at(start)

    @staticmethod
    def _busy() -> float:
        import psutil

        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def gpu_peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def gpu_peak() -> int:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU, {os.cpu_count()} cores"
