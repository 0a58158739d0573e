"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/run.py --config configs/caption.yaml`.

Thin over the same library call as `qwenbatch run` (every other argument is passed on: overrides,
`--date`, `--force`); inside a submitted job Ray sets RAY_ADDRESS, so the job runs on the cluster it
was submitted to, and the same command runs locally on a machine without one.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

import qwenbatch
from qwenbatch.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    args, rest = parser.parse_known_args()
    # Which code runs: the submitted working_dir's copy, or an installed one.
    print(f"qwenbatch {metadata.version('qwenbatch')} from {Path(qwenbatch.__file__).parent}", flush=True)
    sys.exit(main(["run", args.config, *rest]))
