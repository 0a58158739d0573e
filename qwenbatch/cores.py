"""A replica on CPU computes on the cores the load actors leave free (tests and demos run there)."""

from __future__ import annotations

import time


def free_cores(cores: int, busy_s: float, own_s: float, wall_s: float) -> int:
    """Cores this process may compute on: all but those other processes kept busy over the last interval."""
    others = max(0.0, busy_s - own_s) / wall_s if wall_s > 0 else 0.0
    return max(1, min(cores, round(cores - others)))


class CoreShare:
    """Torch threads for a replica on CPU, renewed before each batch.

    The load actors share the node's cores: threads that compete with them for a core wait on each
    other at every barrier, so the replica computes on the cores they leave free, and on all of
    them once loading is done.
    """

    def __init__(self, cores: int) -> None:
        self.cores = cores
        self.last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        import psutil

        system = psutil.cpu_times()
        busy = sum(system) - system.idle - getattr(system, "iowait", 0.0)
        own = psutil.Process().cpu_times()
        return busy, own.user + own.system, time.monotonic()

    def threads(self) -> int:
        now = self._sample()
        busy, own, wall = (a - b for a, b in zip(now, self.last, strict=True))
        self.last = now
        return free_cores(self.cores, busy, own, wall)
