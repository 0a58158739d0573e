"""Config: YAML validated into typed config; every problem is one line, exit 2, before Ray starts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from qwenbatch import schema
from qwenbatch.config import ConfigError, load_config
from tests.helpers import REPO

GOOD = """
model: Qwen/Qwen3-VL-8B-Instruct
task: {kind: vqa}
input: {path: /data/manifest.parquet}
output: {path: /data/out}
"""

# The child process runs the CLI, then reports whether Ray was ever started.
CHILD = """
import sys
from qwenbatch.cli import main
code = main(sys.argv[1:])
import ray
print("RAY_STARTED" if ray.is_initialized() else "RAY_NOT_STARTED", file=sys.stderr)
sys.exit(code)
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_good_config_with_defaults(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.model.name == "Qwen/Qwen3-VL-8B-Instruct"
    assert config.task.kind == "vqa"
    assert config.generation.do_sample is False
    assert config.max_pixels() == schema.DEFAULT_MAX_PIXELS
    assert config.max_pixels() < 16384 * schema.PIXELS_PER_TOKEN  # well below the checkpoint's budget
    assert config.run.replicas == 1


def test_every_field_overridable(tmp_path):
    config = load_config(
        write(tmp_path, GOOD),
        [
            "model.dtype=float32",
            "model.revision=abc123",
            "run.batch_size=4",
            "run.replicas=2-6",
            "generation.do_sample=true",
            "generation.temperature=0.2",
            "image.max_pixels=262144",
            "task.kind=custom",
            "task.prompt=Is there a {object}?",
            "input.id_column=key",
        ],
    )
    assert config.model.name == "Qwen/Qwen3-VL-8B-Instruct"  # the shorthand survives a nested override
    assert config.model.dtype == "float32" and config.model.revision == "abc123"
    assert config.run.batch_size == 4 and config.run.replicas == (2, 6)
    assert config.generation.do_sample is True and config.generation.temperature == 0.2
    assert config.max_pixels() == 262144
    assert config.task.kind == "custom" and config.task.prompt == "Is there a {object}?"
    assert config.input.id_column == "key"


def test_document_task_gets_a_larger_budget(tmp_path):
    config = load_config(write(tmp_path, GOOD), ["task.kind=document"])
    assert config.max_pixels() == schema.DOCUMENT_MAX_PIXELS > schema.DEFAULT_MAX_PIXELS


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("model: [unclosed\n", [], "invalid YAML at line"),
        (GOOD + "run: {batch_sise: 4}\n", [], "run.batch_sise: unknown key"),
        (GOOD + "colour: blue\n", [], "colour: unknown key"),
        (GOOD + "run: {batchsize: 4}\n", [], "run.batchsize: unknown key; did you mean run.batch_size?"),
        (GOOD + "pdf: {mode: per_page, pags: [1]}\n", [], "pdf.pags: unknown key; did you mean pdf.pages?"),
        (GOOD, ["image.formatz=[PNG]"], "image.formatz: unknown key; did you mean image.formats?"),
        (GOOD, ["runn.batch_size=4"], "runn: unknown key; did you mean run?"),
        (GOOD, ["run.batch_size=0"], "run.batch_size: Input should be greater than or equal to 1"),
        (GOOD, ["model.dtype=fp8"], "model.dtype: Input should be"),
        (GOOD, ["task.kind=poem"], "task.kind: Input should be"),
        (GOOD, ["run.replicas=4-2"], "run.replicas"),
        (GOOD, ["task.kind=custom"], "needs task.prompt"),
        ("model: x\ninput: {path: a}\n", [], "output: required key is missing"),
        ("- a\n- b\n", [], "must be a mapping"),
        (GOOD, ["generation.min_new_tokens=500"], "min_new_tokens must not exceed"),
        (GOOD, ["run.device=cpu", "run.processor_device=cuda"], "run.processor_device 'cuda' needs the replicas"),
        (GOOD, ["run.max_batch_tokens=10"], "run.max_batch_tokens: Input should be greater than or equal to 64"),
    ],
)
def test_bad_config_is_one_line(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("model: [unclosed\n", [], "invalid YAML"),
        (GOOD + "run: {batch_sise: 4}\n", [], "run.batch_sise: unknown key"),
        (GOOD, ["run.batch_size=-3"], "run.batch_size"),
    ],
)
def test_cli_rejects_bad_config_before_ray_starts(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "run", str(path), *overrides], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("qwenbatch: error:") and message in lines[0]
    assert lines[1:] == ["RAY_NOT_STARTED"]


def test_unknown_key_without_a_close_name_gets_no_guess(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, GOOD + "colour: blue\n"))
    assert str(error.value).endswith(": colour: unknown key")


def test_cli_suggests_the_key_meant():
    """The line a user meets at the command line, for a typo in an override of a shipped config."""
    done = subprocess.run(
        [sys.executable, "-m", "qwenbatch.cli", "config", "configs/caption.yaml", "run.batchsize=4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        "qwenbatch: error: configs/caption.yaml: run.batchsize: unknown key; did you mean run.batch_size?\n"
    )


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_the_package_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, GOOD), ["model.attn_implementation=flash_attention_2"])
    assert str(error.value).endswith(
        "model.attn_implementation: flash_attention_2 needs the flash-attn package (pip install flash-attn); use sdpa"
    )


def test_gpu_options_are_config(tmp_path):
    config = load_config(
        write(tmp_path, GOOD), ["generation.compile=true", "run.processor_device=cuda", "run.max_batch_tokens=90000"]
    )
    assert config.generation.compile and config.run.processor_device == "cuda" and config.run.max_batch_tokens == 90000
    assert load_config(write(tmp_path, GOOD)).run.max_batch_tokens is None  # from GPU memory, or the CPU default


SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=str)
def test_every_shipped_config_validates(path):
    config = load_config(path, ["input.path=/in", "output.path=/out"])
    assert config.model.name


@pytest.mark.parametrize("path", SHIPPED, ids=str)
def test_shipped_configs_agree_with_the_defaults(path):
    """Every task takes PDFs; a batch size other than the default says why, in a comment beside it."""
    config = load_config(path, ["input.path=/in", "output.path=/out"])
    assert schema.PDF_FORMAT in config.image.formats
    batch_lines = [line for line in path.read_text().splitlines() if line.strip().startswith("batch_size:")]
    assert config.run.batch_size == schema.DEFAULT_BATCH_SIZE or "#" in batch_lines[0], batch_lines
