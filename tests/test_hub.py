"""A model no replica could get fails in one line on the driver, before Ray starts: a hub id neither in the
local cache (HF_HOME) nor downloadable (HF_HUB_OFFLINE, or no network), or a local folder that is not there."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, job_data, write_images, write_manifest

MODEL = "Qwen/Qwen3-VL-2B-Instruct"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.fixture
def job(tmp_path: Path) -> Path:
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "image": str(write_images(tmp_path, 1)[0])}])
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job_data(Path("unused"), manifest, tmp_path / "out") | {"model": MODEL}))
    return config


def run_cli(job: Path, tmp_path: Path, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "RAY_"))}
    environment |= {"PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"), "RAY_TMPDIR": str(tmp_path / "ray")}
    environment = {k: v for k, v in (environment | env).items() if "proxy" not in k.lower()}
    command = [sys.executable, "-m", "qwenbatch.cli", "run", str(job)]
    return subprocess.run(command, env=environment, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_offline_and_not_cached(job, tmp_path):
    done = run_cli(job, tmp_path, HF_HUB_OFFLINE="1")
    assert done.returncode == 2
    assert done.stderr == (
        f"qwenbatch: error: model: {MODEL} is not in the local Hugging Face cache ({tmp_path / 'hf' / 'hub'}, from "
        "HF_HOME) and HF_HUB_OFFLINE forbids downloading it: download it into that cache on a machine with network, "
        "point HF_HOME at a cache that holds it, or give a local folder\n"
    )
    assert not (tmp_path / "ray").exists() and not (tmp_path / "out").exists(), "Ray never started, nothing written"


def test_no_network_and_not_cached(job, tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    done = run_cli(job, tmp_path, HF_ENDPOINT=endpoint)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"qwenbatch: error: model: {MODEL} is not in ")
    assert f"and {endpoint} cannot be reached to download it: point HF_HOME at a cache" in done.stderr
    assert "HF_HUB_OFFLINE=1" in done.stderr
    assert not (tmp_path / "ray").exists()


def test_a_typo_in_a_local_folder_is_named_as_one(job, tmp_path):
    """`demo_out/modle` beside `demo_out/model` is a folder that is not there, not a hub id to download."""
    (tmp_path / "demo_out" / "model").mkdir(parents=True)
    job.write_text(job.read_text().replace(MODEL, "demo_out/modle"))
    done = run_cli(job, tmp_path, cwd=tmp_path, HF_HUB_OFFLINE="1")
    assert done.returncode == 2
    assert done.stderr == "qwenbatch: error: model: demo_out/modle: no such folder; did you mean demo_out/model?\n"
    assert not (tmp_path / "ray").exists()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/nowhere/model", "model: /nowhere/model: no such folder"),
        ("./demo_out/mdel", "model: ./demo_out/mdel: no such folder; did you mean ./demo_out/model?"),
        ("~/models/qwen", "model: ~/models/qwen: no such folder"),
        ("models/qwen/8b", "model: models/qwen/8b: no such folder"),  # two slashes: no hub id
        ("demo_out/zzz", "model: demo_out/zzz: no such folder"),  # nothing close beside it
        ("demo_out/notes.txt", "model: demo_out/notes.txt: not a folder"),
    ],
)
def test_local_paths_are_checked_as_folders(name, message, tmp_path, monkeypatch):
    from qwenbatch.config import ConfigError, ModelConfig
    from qwenbatch.hub import require_model

    (tmp_path / "demo_out" / "model").mkdir(parents=True)
    (tmp_path / "demo_out" / "notes.txt").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        require_model(ModelConfig(name=name))
    assert str(error.value) == message


def test_cached_model_passes_the_check(tmp_path):
    """A hub id in the cache HF_HOME names is accepted offline (the check only: no weights here)."""
    snapshot = tmp_path / "hf" / "hub" / f"models--{MODEL.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    check = (
        "from qwenbatch.hub import require_model; from qwenbatch.config import ModelConfig; "
        f"require_model(ModelConfig(name={MODEL!r})); print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}

    def python(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)

    done = python(check)
    assert done.stdout == "ok\n", done.stderr
    assert "HF_HUB_OFFLINE forbids" in python(check.replace(MODEL, "Qwen/Other")).stderr
