"""`generation.compile`: static KV cache and a compiled decode step give eager's greedy text, in few shapes;
`auto` (the default) compiles on CUDA only; a compilation that fails leaves the replica decoding eagerly.

Runs on CPU (torch's inductor compiles there with the system C compiler); about a minute on 2 cores.
"""

from __future__ import annotations

import logging

import pytest
import torch

from qwenbatch import schema
from qwenbatch.config import ConfigError, GenerationConfig, ModelConfig, load_config
from qwenbatch.infer import Generator, compile_config
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
    before = compiled_graphs()  # dynamo's counters outlive its reset: other tests' compilations count there
    got = compiled(batch)  # groups of 4 and 3 rows: both padded to 4, prompts to one length bucket
    graphs = compiled_graphs() - before
    assert got.column(schema.TEXT).to_pylist() == expected.column(schema.TEXT).to_pylist()
    assert got.column(schema.OUTPUT_TOKENS).to_pylist() == expected.column(schema.OUTPUT_TOKENS).to_pylist()
    assert got.column(schema.INPUT_TOKENS).to_pylist() == expected.column(schema.INPUT_TOKENS).to_pylist()
    assert graphs == 1  # one decode shape (without buckets: a second graph for the 3-row group)
    again = compiled(batch.slice(0, 3))  # 3 rows: the same bucket, no new compilation
    assert compiled_graphs() - before == 1
    assert again.column(schema.TEXT).to_pylist() == expected.column(schema.TEXT).to_pylist()[:3]


def test_compile_auto_is_on_for_cuda_replicas_only():
    assert GenerationConfig().compile == "auto"
    assert GenerationConfig().compiles_on("cuda") and not GenerationConfig().compiles_on("cpu")
    assert GenerationConfig(compile=True).compiles_on("cpu") and not GenerationConfig(compile=False).compiles_on("cuda")
    assert load_config(None, ["model=m", "input.path=x", "output.path=y", "generation.compile=true"]).generation.compile
    with pytest.raises(ConfigError, match="generation.compile"):
        load_config(None, ["model=m", "input.path=x", "output.path=y", "generation.compile=cuda"])


def test_auto_leaves_a_cpu_replica_eager(tiny_model):
    gen = Generator(ModelConfig(name=str(tiny_model), dtype="float32"), GenerationConfig(), 4096, 65536, device="cpu")
    assert gen.generation.compile == "auto" and gen._compile is None
    assert "compile_config" not in gen.generate_kwargs() and "cache_implementation" not in gen.generate_kwargs()


def no_compiler(graph: torch.fx.GraphModule, example_inputs: list) -> None:
    """A torch.compile backend that cannot compile anything, as a broken compiler or toolchain would."""
    raise RuntimeError("this compiler is broken")


def test_a_failed_compilation_leaves_the_replica_eager_and_fails_no_row(tiny_model, caplog):
    """The real generate, static cache and torch.compile, with a backend that raises as the first decode step
    compiles: every row still gets eager's text, the warning comes once, and later calls do not try again."""
    model = ModelConfig(name=str(tiny_model), dtype="float32")
    budget = (32 * 32 * 4, 32 * 32 * 64)
    eager = Generator(model, GenerationConfig(max_new_tokens=6), *budget, device="cpu", batch_size=4)
    compiled = Generator(model, GenerationConfig(max_new_tokens=6, compile=True), *budget, device="cpu", batch_size=4)
    broken = compile_config(compiled.model)
    broken.backend = no_compiler
    compiled._compile = broken
    batch = loaded_batch(eager, SIZES)
    expected = eager(batch)
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="qwenbatch.infer"):
        got = compiled(batch)
        again = compiled(batch.slice(0, 3))
    assert got.column(schema.STATUS).to_pylist() == [schema.OK] * len(SIZES)
    assert got.column(schema.TEXT).to_pylist() == expected.column(schema.TEXT).to_pylist()
    assert again.column(schema.TEXT).to_pylist() == expected.column(schema.TEXT).to_pylist()[:3]
    failures = [r.getMessage() for r in caplog.records if "generation.compile failed" in r.getMessage()]
    assert len(failures) == 1 and "this compiler is broken" in failures[0], failures
    assert "retrying in halves" not in caplog.text  # the batch was never split: eager ran it whole
    assert compiled._compile is None and "compile_config" not in compiled.generate_kwargs()
