"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/run.py --config configs/caption.yaml`.

Thin over the same library call as `qwenbatch run`; inside a submitted job, Ray sets
RAY_ADDRESS, so the job runs on the cluster it was submitted to.
"""

from __future__ import annotations

import argparse
import sys

from qwenbatch.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    args, rest = parser.parse_known_args()
    sys.exit(main(["run", args.config, *rest]))
