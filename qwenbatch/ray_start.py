"""Starting Ray in this process, with a second chance for a local node that was slow to register.

`ray.init()` without a cluster starts a local node and waits a fixed 30 s for its raylet to
register; on a loaded machine that wait sometimes runs out ("The current node timed out during
startup"), leaving the half-started node's processes behind. Those are stopped and the start is
tried again, a bounded number of times, each retry logged. Any other failure is raised at once.
"""

from __future__ import annotations

import logging
from typing import Any

from qwenbatch import schema

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = "timed out during startup"  # Ray's message (ray/_private/node.py); it raises a bare Exception


def init_ray(attempts: int = schema.RAY_START_ATTEMPTS, **options: Any) -> None:
    """`ray.init(**options)`, tried up to `attempts` times while the local node times out during startup."""
    import psutil
    import ray

    for attempt in range(1, attempts + 1):
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            ray.init(**options)
            return
        except Exception as exc:
            if STARTUP_TIMEOUT not in str(exc) or attempt == attempts:
                raise
            stopped = _stop_new_children(before)
            ray.shutdown()
            log.warning(
                "Ray's local node timed out during startup (attempt %d of %d); stopped the %d processes it had "
                "started, starting it again",
                attempt,
                attempts,
                stopped,
            )


def _stop_new_children(before: set[int]) -> int:
    """Kill this process's descendants that the failed start spawned (GCS, raylet, agents, reaper)."""
    import psutil

    started = [child for child in psutil.Process().children(recursive=True) if child.pid not in before]
    for child in started:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(started, timeout=schema.RAY_START_STOP_WAIT_S)
    return len(started)
