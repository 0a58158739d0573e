"""`generation.compile`: static KV cache and a compiled decode step give eager's greedy text, in few shapes.

Runs on CPU (torch's inductor compiles there with the system C compiler); about a minute on 2 cores.
"""

from __future__ import annotations

import torch

from qwenbatch import schema
from qwenbatch.config import GenerationConfig, ModelConfig
from qwenbatch.infer import Generator
from tests.test_infer import loaded_batch

SIZES = [(64, 64), (96, 64), (64, 96), (64, 64), (96, 96), (64, 64), (128, 64)]


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compiled_decode_gives_eager_text_with_few_compilations(tiny_model):
    model = ModelConfig(name=str(tiny_model), dtype="float32")
    budget = (32 * 32 * 4, 32 * 32 * 64)
    eager = Generator(model, GenerationConfig(max_new_tokens=6), *budget, device="cpu", batch_size=4)
    compiled = Generator(model, GenerationConfig(max_new_tokens=6, compile=True), *budget, device="cpu", batch_size=4)
    batch = loaded_batch(eager, SIZES)
    expected = eager(batch)
    torch._dynamo.reset()
    got = compiled(batch)  # groups of 4 and 3 rows: both padded to 4, prompts to one length bucket
    graphs = compiled_graphs()
    assert got.column(schema.TEXT).to_pylist() == expected.column(schema.TEXT).to_pylist()
    assert got.column(schema.OUTPUT_TOKENS).to_pylist() == expected.column(schema.OUTPUT_TOKENS).to_pylist()
    assert got.column(schema.INPUT_TOKENS).to_pylist() == expected.column(schema.INPUT_TOKENS).to_pylist()
    assert graphs == 1  # one decode shape (without buckets: a second graph for the 3-row group)
    again = compiled(batch.slice(0, 3))  # 3 rows: the same bucket, no new compilation
    assert compiled_graphs() == 1
    assert again.column(schema.TEXT).to_pylist() == expected.column(schema.TEXT).to_pylist()[:3]
