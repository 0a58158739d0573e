"""Starting a local Ray on a busy machine: a node that times out during startup is stopped and started again.

The slow start is real: the test's child process stops (SIGSTOP) the first raylet its `ray.init` spawns,
so the raylet never registers and Ray's own 30 s wait runs out, exactly as on an overloaded machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import logging, os, signal, sys, threading, time

    import psutil
    import ray

    from qwenbatch.ray_start import init_ray

    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(name)s: %(message)s")
    stopped = []

    def stop_first_raylet():
        while not stopped:
            for child in psutil.Process().children(recursive=True):
                try:
                    if child.name() == "raylet":
                        os.kill(child.pid, signal.SIGSTOP)
                        stopped.append(child.pid)
                        break
                except psutil.NoSuchProcess:
                    continue
            time.sleep(0.01)

    threading.Thread(target=stop_first_raylet, daemon=True).start()
    init_ray(attempts=int(sys.argv[1]), num_cpus=1, include_dashboard=False, log_to_driver=False)
    print("answer", ray.get(ray.remote(lambda: 42).remote()))
    print("stopped raylet", stopped[0], "still there:", psutil.pid_exists(stopped[0]))
    ray.shutdown()
    """
)


def start(attempts: int, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        "PYTHONPATH": str(REPO),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(attempts)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_a_start_that_times_out_is_stopped_and_tried_again(tmp_path):
    done = start(2, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Ray's local node timed out during startup (attempt 1 of 2); stopped the" in done.stdout
    assert "starting it again" in done.stdout
    assert "answer 42" in done.stdout
    assert "still there: False" in done.stdout  # the stopped node's processes were ended, not left running
