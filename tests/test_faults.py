"""Inference faults: out-of-memory batches split down to single rows; a killed infer actor is restarted.

The generator is the plain callable class, fed by the real load and prompt stages, without Ray; the
actor death runs the real pipeline on the shared local Ray.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from qwenbatch import pipeline, schema
from qwenbatch.config import GenerationConfig, ModelConfig, TaskConfig
from qwenbatch.infer import Generator
from qwenbatch.load import Loader
from qwenbatch.locations import LoadLimits
from qwenbatch.prompt import prompt_batch
from tests.helpers import encode, job_config, noise_image, read_output, write_images, write_manifest

MIN_PIXELS, MAX_PIXELS = 32 * 32 * 4, 32 * 32 * 16
POISON = "POISON"


@pytest.fixture(scope="module")
def generator(tiny_model: Path) -> Generator:
    model = ModelConfig(name=str(tiny_model), dtype="float32")
    return Generator(model, GenerationConfig(max_new_tokens=4), MIN_PIXELS, MAX_PIXELS, device="cpu", batch_size=8)


def staged_batch(tiny_model: Path, prompts: list[str | None]) -> pa.Table:
    """Rows as the real load and prompt stages hand them to the infer stage (same-sized images)."""
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(len(prompts))],
            schema.IMAGE_BYTES: [encode(noise_image(64, 64, seed), "PNG") for seed in range(len(prompts))],
            schema.PROMPT: pa.array(prompts, pa.string()),
        }
    )
    limits = LoadLimits(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, allowed_prefixes=())
    loaded = Loader(model=str(tiny_model), revision=None, limits=limits, image_column="image")(table)
    return prompt_batch(loaded, model=str(tiny_model), revision=None, task=TaskConfig(kind="caption"))


def column(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist()


def test_out_of_memory_splits_down_and_every_row_gets_its_text(
    generator: Generator, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = staged_batch(tiny_model, [None] * 6)
    expected = generator(batch)
    assert set(column(expected, schema.STATUS)) == {schema.OK}

    real_generate = generator.model.generate
    sizes: list[int] = []
    held: list[weakref.ref] = []
    alive_at_call: list[bool] = []

    def generate_or_oom(**inputs):
        size = inputs["input_ids"].shape[0]
        sizes.append(size)
        alive_at_call.append(any(ref() is not None for ref in held))
        if size > 2:
            activations = torch.empty(size, 1024, 1024)  # what a failed call's frames hold on to
            held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_generate(**inputs)

    monkeypatch.setattr(generator.model, "generate", generate_or_oom)
    got = generator(batch)

    assert sizes == [6, 3, 1, 2, 3, 1, 2]  # halves until a batch fits, never a row dropped
    assert not any(alive_at_call)  # each retry ran after the failed call's tensors were freed
    assert column(got, schema.STATUS) == [schema.OK] * 6
    assert column(got, schema.ERROR) == [None] * 6
    assert column(got, schema.TEXT) == column(expected, schema.TEXT)
    assert column(got, schema.OUTPUT_TOKENS) == column(expected, schema.OUTPUT_TOKENS)
    assert column(got, "id") == column(batch, "id")


def test_a_row_that_always_fails_gets_infer_error_alone(
    generator: Generator, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [None, None, f"{POISON} describe", None, None]
    batch = staged_batch(tiny_model, prompts)
    expected = generator(batch)

    real_generate = generator.generate

    def fails_with_poison(chats: list[str], images: list):
        if any(POISON in chat for chat in chats):
            raise RuntimeError("CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA")
        return real_generate(chats, images)

    monkeypatch.setattr(generator, "generate", fails_with_poison)
    got = generator(batch)

    statuses = column(got, schema.STATUS)
    assert statuses == [schema.OK, schema.OK, schema.INFER_ERROR, schema.OK, schema.OK]
    assert column(got, schema.ERROR)[2] == (
        "RuntimeError: CUDA error: device-side assert triggered Compile with TORCH_USE_CUDA_DSA"
    )  # one line
    assert column(got, schema.TEXT)[2] is None and column(got, schema.OUTPUT_TOKENS)[2] is None
    for index in (0, 1, 3, 4):
        assert column(got, schema.TEXT)[index] == column(expected, schema.TEXT)[index]


def test_killed_infer_actor_is_restarted_and_rows_are_written_once(
    tmp_path: Path, tiny_model: Path, ray_local, monkeypatch: pytest.MonkeyPatch
) -> None:
    died, starts = tmp_path / "died", tmp_path / "starts"

    class DiesOnce(Generator):
        """Its process exits on its second batch, once per test (the marker file says it happened)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.batches = 0
            with open(starts, "a") as log:
                log.write(f"{os.getpid()}\n")

        def __call__(self, batch: pa.Table) -> pa.Table:
            self.batches += 1
            if self.batches == 2 and not died.exists():
                died.touch()
                os._exit(1)  # the worker process dies, as on a segfault or a node's OOM killer
            return super().__call__(batch)

    monkeypatch.setattr(pipeline, "Generator", DiesOnce)
    paths = write_images(tmp_path / "images", 12, sizes=[(64, 64), (96, 64)])
    manifest = write_manifest(tmp_path / "manifest.parquet", [{"id": p.stem, "image": str(p)} for p in paths])
    config = job_config(tiny_model, manifest, tmp_path / "out", run={"batch_size": 2})

    result = pipeline.run(config)

    assert died.exists()  # the actor really died mid-run
    pids = starts.read_text().split()
    assert len(pids) >= 2 and len(set(pids)) >= 2  # and a new process took over
    table = read_output(tmp_path / "out")
    assert sorted(column(table, "id")) == sorted(p.stem for p in paths)  # every row exactly once
    assert set(column(table, schema.STATUS)) == {schema.OK}
    assert result.succeeded and result.summary["this_run"]["rows"] == 12
