"""Shared fixtures: one tiny model and one local Ray for the whole session, real files per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qwenbatch.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_thinking_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Thinking variant: its template opens <think>, and greedy decoding writes a known script."""
    from qwenbatch.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "thinking", thinking=True)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray, started once: starting Ray costs seconds, tests share it. A start that times out
    on a busy machine is tried again (`init_ray`), so one slow start does not fail every test that uses it."""
    import ray

    from qwenbatch.ray_start import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need CUDA: they skip, saying so, on machines without it (CI has none)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
