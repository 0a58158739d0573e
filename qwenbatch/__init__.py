"""qwenbatch: batch Qwen3-VL over large image collections, as an offline Ray Data job.

`qwenbatch.process(dataset, config)` applies the job's stages to a Ray Dataset of your own.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

# Ray's notice that token authentication is on (the default for a local cluster), which a user's own
# `ray.data.read_*` prints when it starts Ray before `qwenbatch.process` can quiet it: errors only.
RAY_AUTH_NOTICE = "ray._private.authentication.authentication_token_setup"
logging.getLogger(RAY_AUTH_NOTICE).setLevel(logging.ERROR)

__version__ = "0.1.0"
__all__ = ["process"]

if TYPE_CHECKING:
    from qwenbatch.api import process


def __getattr__(name: str) -> Any:
    """`qwenbatch.process` without importing Ray and torch for every `import qwenbatch` (the CLI's, the workers')."""
    if name == "process":
        from qwenbatch.api import process

        return process
    raise AttributeError(f"module 'qwenbatch' has no attribute {name!r}")
