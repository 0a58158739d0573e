"""The replica's CUDA-only paths, on the tiny model: they run where a GPU is, and skip cleanly elsewhere.

Pinned-memory copies on a side stream, the token budget from free memory, preprocessing on the GPU,
compiled decoding with CUDA graphs, and splitting a batch that runs out of device memory.
"""

from __future__ import annotations

import logging

import pytest
import torch

from qwenbatch import schema
from qwenbatch.config import GenerationConfig, ModelConfig
from tests.test_infer import loaded_batch

pytestmark = pytest.mark.gpu
SIZES = [(64, 64), (96, 64), (64, 96), (128, 128), (96, 96), (64, 64)]
BUDGET = (32 * 32 * 4, 32 * 32 * 64)


def generator(tiny_model, **options):
    """A replica on the GPU, eager unless `compile` says otherwise ("auto": the default, compiled on CUDA)."""
    from qwenbatch.infer import Generator

    generation = GenerationConfig(max_new_tokens=6, compile=options.pop("compile", False))
    model = ModelConfig(name=str(tiny_model), dtype="float32")
    return Generator(model, generation, *BUDGET, device="cuda", batch_size=4, **options)


def texts(table) -> list[str]:
    return table.column(schema.TEXT).to_pylist()


def images_of(batch) -> list[torch.Tensor]:
    from qwenbatch.loaded import pixels_to_array

    pixels, widths, heights = (batch.column(c).to_pylist() for c in (schema.PIXELS, schema.WIDTH, schema.HEIGHT))
    return [torch.from_numpy(pixels_to_array(p, w, h).copy()).permute(2, 0, 1) for p, w, h in zip(pixels, widths,
            heights, strict=True)]  # fmt: skip


def test_overlapped_copies_give_the_text_of_plain_calls(tiny_model):
    """Prepared on the side stream from pinned memory: the text of plain processor + generate calls on
    the same batches, moved to the GPU with a plain `.to("cuda")`."""
    from qwenbatch.batching import plan_batches

    gen = generator(tiny_model)
    assert gen.device == "cuda" and gen._copy_stream is not None
    batch = loaded_batch(gen, SIZES)
    got = gen(batch)
    assert got.column(schema.STATUS).to_pylist() == [schema.OK] * len(SIZES)
    chats, images = batch.column(schema.CHAT).to_pylist(), images_of(batch)
    expected: dict[int, str] = {}
    for group in plan_batches(batch.column(schema.IMAGE_TOKENS).to_pylist(), 4, gen.max_batch_tokens):
        inputs = gen.processor(text=[chats[i] for i in group], images=[images[i] for i in group],
                               return_tensors="pt", padding=True, size=gen.size).to("cuda")  # fmt: skip
        with torch.inference_mode():
            out = gen.model.generate(**inputs, **gen.generate_kwargs())
        for i, ids in zip(group, out[:, inputs["input_ids"].shape[1] :].tolist(), strict=True):
            expected[i] = gen._output(ids, 0).text
    assert texts(got) == [expected[i] for i in range(len(SIZES))]
    assert gen.clock.figures.peak_memory_bytes > 0


def test_token_budget_comes_from_free_memory(tiny_model, caplog):
    with caplog.at_level(logging.INFO, logger="qwenbatch.infer"):
        gen = generator(tiny_model)
    free, _ = torch.cuda.mem_get_info()
    assert gen.max_batch_tokens > schema.DEFAULT_MAX_BATCH_TOKENS  # a tiny model leaves nearly all of it
    assert gen.max_batch_tokens <= free  # at least a byte per token
    assert "run.max_batch_tokens unset" in caplog.text


def test_processor_on_the_gpu_prepares_the_same_pixels(tiny_model):
    cpu, gpu = generator(tiny_model), generator(tiny_model, processor_device="cuda")
    batch = loaded_batch(cpu, SIZES[:2])
    chats, images = batch.column(schema.CHAT).to_pylist(), images_of(batch)
    on_cpu, on_gpu = cpu.prepare(chats, images), gpu.prepare(chats, images)
    torch.testing.assert_close(on_gpu.inputs["pixel_values"], on_cpu.inputs["pixel_values"])
    assert torch.equal(on_gpu.inputs["input_ids"], on_cpu.inputs["input_ids"])
    assert texts(gpu(batch)) == texts(cpu(batch))


def test_compiled_decode_on_cuda_gives_eager_text(tiny_model, caplog):
    """The default (`auto`) on CUDA: static cache, a compiled decode step replayed as CUDA graphs; eager's greedy
    text, without falling back, and without inductor skipping the graphs."""
    from torch._dynamo.utils import counters

    eager, compiled = generator(tiny_model), generator(tiny_model, compile="auto")
    assert compiled._compile is not None and compiled._compile.mode == "reduce-overhead"
    batch = loaded_batch(eager, SIZES)
    expected = texts(eager(batch))
    torch._dynamo.reset()
    counters.clear()
    with caplog.at_level(logging.WARNING, logger="qwenbatch.infer"):
        got = compiled(batch)
    assert "generation.compile failed" not in caplog.text and compiled._compile is not None
    assert got.column(schema.STATUS).to_pylist() == [schema.OK] * len(SIZES)
    assert texts(got) == expected
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def test_out_of_memory_on_the_device_splits_the_batch(tiny_model, monkeypatch):
    """A real CUDA OOM (a huge allocation inside generate) halves the batch; every row still gets its text."""
    gen = generator(tiny_model)
    batch = loaded_batch(gen, SIZES[:4])
    expected = texts(gen(batch))
    real = gen.model.generate

    def oom_when_batched(**inputs):
        if inputs["input_ids"].shape[0] > 1:
            torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # a petabyte: a real CUDA OOM
        return real(**inputs)

    monkeypatch.setattr(gen.model, "generate", oom_when_batched)
    got = gen(batch)
    assert got.column(schema.STATUS).to_pylist() == [schema.OK] * 4
    assert texts(got) == expected
