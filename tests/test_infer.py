"""The GPU stage as a plain callable class: batch planning, and batching that never changes results."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pyarrow as pa

from qwenbatch import schema
from qwenbatch.config import GenerationConfig, ModelConfig
from qwenbatch.infer import CoreShare, Generator, free_cores, plan_batches
from qwenbatch.outputs import split_reasoning
from tests.helpers import noise_image


def test_plan_batches_groups_similar_sizes_within_budget():
    tokens = [64, 1280, 80, 1200, 64, 96, 1280, 72]
    groups = plan_batches(tokens, batch_size=4, max_batch_tokens=2600)
    assert sorted(p for g in groups for p in g) == list(range(len(tokens)))  # every row once
    for group in groups:
        assert len(group) <= 4
        assert len(group) * max(tokens[p] for p in group) <= 2600 or len(group) == 1
    assert [sorted(tokens[p] for p in g) for g in groups] == [[64, 64, 72, 80], [96, 1200], [1280, 1280]]


def test_plan_batches_single_row_over_budget_still_runs():
    assert plan_batches([5000, 10], batch_size=8, max_batch_tokens=100) == [[1], [0]]


def test_split_reasoning():
    assert split_reasoning("<think>count the cats</think>\n\nThree cats.") == (
        "Three cats.",
        "count the cats",
    )
    assert split_reasoning(" A dog. ") == ("A dog.", None)


def loaded_batch(generator: Generator, sizes: list[tuple[int, int]]) -> pa.Table:
    """Rows as the load and prompt stages hand them to the infer stage."""
    from qwenbatch.config import TaskConfig
    from qwenbatch.prompt import chat_messages

    chat = generator.processor.apply_chat_template(
        chat_messages(TaskConfig(kind="caption"), "Describe."), tokenize=False, add_generation_prompt=True
    )
    pixels, widths, heights = [], [], []
    for index, (width, height) in enumerate(sizes):
        pixels.append(noise_image(width, height, seed=index).tobytes())
        widths.append(width)
        heights.append(height)
    return pa.table(
        {
            "id": [f"r{i}" for i in range(len(sizes))],
            schema.PIXELS: pa.array(pixels, pa.large_binary()),
            schema.WIDTH: pa.array(widths, pa.int32()),
            schema.HEIGHT: pa.array(heights, pa.int32()),
            schema.IMAGE_TOKENS: pa.array([w * h // 1024 for w, h in sizes], pa.int32()),
            schema.STATUS: [schema.OK] * len(sizes),
            schema.ERROR: pa.array([None] * len(sizes), pa.string()),
            schema.CHAT: [chat] * len(sizes),
        }
    )


def test_batching_does_not_change_results(tiny_model):
    """Token budget grouping, batch sizes and order: the same text for every row."""
    sizes = [(64, 64), (256, 128), (32, 320), (128, 128), (96, 224), (64, 64)]
    model = ModelConfig(name=str(tiny_model), dtype="float32")
    generation = GenerationConfig(max_new_tokens=6)
    one_by_one = Generator(model, generation, 32 * 32 * 4, 32 * 32 * 64, device="cpu", batch_size=1)
    batch = loaded_batch(one_by_one, sizes)
    expected = one_by_one(batch)
    for batch_size, budget in ((8, 32768), (3, 100), (8, 64)):
        other = Generator(model, generation, 32 * 32 * 4, 32 * 32 * 64, device="cpu", batch_size=batch_size,
                          max_batch_tokens=budget)  # fmt: skip
        got = other(batch)
        assert got.column(schema.TEXT).to_pylist() == expected.column(schema.TEXT).to_pylist()
        assert got.column(schema.OUTPUT_TOKENS).to_pylist() == expected.column(schema.OUTPUT_TOKENS).to_pylist()
        assert got.column("id").to_pylist() == batch.column("id").to_pylist()
        assert schema.PIXELS not in got.column_names and schema.CHAT not in got.column_names
    assert all(status == schema.OK for status in expected.column(schema.STATUS).to_pylist())


def test_free_cores_leaves_the_cores_others_use():
    assert free_cores(2, busy_s=2.0, own_s=1.0, wall_s=1.0) == 1  # a load actor kept one core busy
    assert free_cores(2, busy_s=1.9, own_s=1.8, wall_s=1.0) == 2  # only this replica computed
    assert free_cores(4, busy_s=8.0, own_s=0.0, wall_s=1.0) == 1  # never below one thread
    assert free_cores(2, busy_s=0.0, own_s=0.0, wall_s=0.0) == 2


def test_cpu_replica_computes_on_the_cores_others_leave_free(tiny_model):
    """With another process spinning on a core, a replica given 2 cores runs its batches on 1 thread:
    free_cores over the system's own counters, applied before each generate batch."""
    import torch

    model = ModelConfig(name=str(tiny_model), dtype="float32")
    generator = Generator(model, GenerationConfig(max_new_tokens=2), 32 * 32 * 4, 32 * 32 * 64, device="cpu",
                          cpu_threads=2)  # fmt: skip
    assert isinstance(generator.cores, CoreShare) and generator.cores.cores == min(2, os.cpu_count() or 1)
    batch = loaded_batch(generator, [(64, 64), (96, 64)])
    before = torch.get_num_threads()
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        torch.set_num_threads(2)
        time.sleep(1.0)
        generator.cores.threads()  # start the interval after the burner is spinning
        time.sleep(1.0)
        assert generator(batch).column(schema.STATUS).to_pylist() == [schema.OK, schema.OK]
        assert torch.get_num_threads() == 1
    finally:
        burner.kill()
        burner.wait()
        torch.set_num_threads(before)
