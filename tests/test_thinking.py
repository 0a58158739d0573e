"""Thinking variants: `reasoning` and `text` split end to end, including rows cut by the length limit.

The tiny Thinking model's template opens `<think>` like Qwen3-VL-*-Thinking, and its weights make greedy
decoding write a known script (qwenbatch.tiny.thinking_script): reasoning, `</think>`, an answer whose last
character (a cat emoji after a space) spans three tokens, then `<|im_end|>`. A length cut inside such a
character ends the text in U+FFFD, exactly as transformers decodes it (docs/configuration.md, "Length cuts
and multi-token characters").
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoProcessor, AutoTokenizer

from qwenbatch import schema
from qwenbatch.config import GenerationConfig, ModelConfig
from qwenbatch.infer import Generator
from qwenbatch.outputs import decode_answer, opens_thinking, split_reasoning
from qwenbatch.pipeline import run
from qwenbatch.tiny import THINKING_ANSWER, THINKING_REASONING, thinking_script
from tests.helpers import job_config, read_output, write_images, write_manifest
from tests.test_infer import loaded_batch

QUESTIONS = ["这张图片里有什么？", "この画像には何がありますか？", "What's here? 🐱🐶", "Что это? 무엇입니까?"]


@pytest.fixture(scope="module")
def tokenizer(tiny_thinking_model: Path):
    return AutoTokenizer.from_pretrained(tiny_thinking_model)


@pytest.fixture(scope="module")
def script(tokenizer) -> list[int]:
    return thinking_script(tokenizer)


def test_split_reasoning_of_thinking_outputs():
    assert split_reasoning("count the cats\n</think>\n\nTwo.", thinking=True) == ("Two.", "count the cats")
    assert split_reasoning("count the cats, one", thinking=True) == ("", "count the cats, one")
    assert split_reasoning("<think>count the", thinking=False) == ("", "count the")
    assert split_reasoning("Two cats.", thinking=False) == ("Two cats.", None)


def test_opens_thinking(tiny_model, tiny_thinking_model):
    assert opens_thinking(AutoProcessor.from_pretrained(tiny_thinking_model))
    assert not opens_thinking(AutoProcessor.from_pretrained(tiny_model))


def test_decode_answer_is_transformers_decode(tokenizer):
    """A cut inside a character (the cat after a space is 3 tokens) ends in U+FFFD, as transformers decodes it."""
    ids = tokenizer("猫 🐱").input_ids
    assert len(ids) == 4
    for cut in (ids[:-1], ids[:-2]):
        assert tokenizer.decode(cut) == "猫 \ufffd"
        assert decode_answer(tokenizer, cut, thinking=False) == ("猫 \ufffd", None)
        assert decode_answer(tokenizer, cut, thinking=True) == ("", "猫 \ufffd")
    assert decode_answer(tokenizer, [*ids, tokenizer.eos_token_id], thinking=False) == ("猫 🐱", None)


@pytest.mark.parametrize(("cut_from_end", "text"), [(2, THINKING_ANSWER[:-1] + "\ufffd"), (0, THINKING_ANSWER)])
def test_generator_answer_cut_inside_an_emoji(tiny_thinking_model, script, cut_from_end, text):
    """Cut two tokens before the end, the answer's last emoji is left open: U+FFFD, as transformers decodes it."""
    limit = len(script) - cut_from_end
    generator = Generator(
        ModelConfig(name=str(tiny_thinking_model), dtype="float32"),
        GenerationConfig(max_new_tokens=limit),
        32 * 32 * 4,
        32 * 32 * 64,
        device="cpu",
    )
    out = generator(loaded_batch(generator, [(64, 64), (96, 160)])).to_pylist()
    finish = schema.FINISH_STOP if cut_from_end == 0 else schema.FINISH_LENGTH
    for row in out:
        assert (row[schema.TEXT], row[schema.REASONING]) == (text, THINKING_REASONING)
        assert row[schema.FINISH_REASON] == finish and row[schema.OUTPUT_TOKENS] == limit


def run_thinking(model: Path, folder: Path, max_new_tokens: int) -> list[dict]:
    paths = write_images(folder / "images", len(QUESTIONS))
    pairs = enumerate(zip(paths, QUESTIONS, strict=True))
    rows = [{"id": f"q{i}", "image": str(path), "question": question} for i, (path, question) in pairs]
    manifest = write_manifest(folder / "manifest.parquet", rows)
    config = job_config(
        model, manifest, folder / "out", task={"kind": "vqa"}, generation={"max_new_tokens": max_new_tokens}
    )
    result = run(config)
    assert result.succeeded, result.summary
    out = sorted(read_output(folder / "out").to_pylist(), key=lambda row: row["id"])
    assert [row["id"] for row in out] == [row["id"] for row in rows]
    assert [row["question"] for row in out] == QUESTIONS
    assert all(row[schema.STATUS] == schema.OK for row in out)
    return out


def test_pipeline_splits_reasoning_and_answer(tiny_thinking_model, ray_local, script, tmp_path):
    for row in run_thinking(tiny_thinking_model, tmp_path, max_new_tokens=len(script) + 8):
        assert row[schema.TEXT] == THINKING_ANSWER
        assert row[schema.REASONING] == THINKING_REASONING
        assert row[schema.FINISH_REASON] == schema.FINISH_STOP and row[schema.OUTPUT_TOKENS] == len(script)


def test_pipeline_row_cut_before_think_end(tiny_thinking_model, ray_local, script, tokenizer, tmp_path):
    """Cut inside the reasoning: no answer, the reasoning so far."""
    limit = 9
    assert tokenizer.decode(script[:limit]) == "The user asks what is in the picture:"
    for row in run_thinking(tiny_thinking_model, tmp_path, max_new_tokens=limit):
        assert row[schema.TEXT] == ""
        assert row[schema.REASONING] == "The user asks what is in the picture:"
        assert row[schema.FINISH_REASON] == schema.FINISH_LENGTH and row[schema.OUTPUT_TOKENS] == limit
