"""How rows become `generate` calls: compile buckets, prompt padding, and the token budget from GPU memory."""

from __future__ import annotations

import torch

from qwenbatch import schema
from qwenbatch.batching import bucket_length, bucket_rows, kv_bytes_per_token, pad_prompts_left, token_budget
from qwenbatch.bench.shape import qwen3_vl_8b_config


def test_buckets_are_few_powers_of_two():
    assert [bucket_rows(n, 32) for n in (1, 2, 3, 5, 17, 32)] == [1, 2, 4, 8, 32, 32]
    assert bucket_rows(5, 6) == 6  # never past the batch size
    assert [bucket_length(n) for n in (1, 64, 65, 790, 1300)] == [64, 64, 128, 1024, 2048]
    assert len({bucket_rows(n, 32) for n in range(1, 33)}) == 6


def test_prompts_are_left_padded_as_batching_pads_them():
    inputs = {
        "input_ids": torch.tensor([[5, 6, 7], [0, 8, 9]]),
        "attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]]),
        "mm_token_type_ids": torch.tensor([[0, 1, 0], [0, 1, 0]]),
        "pixel_values": torch.ones(8, 4),
    }
    padded = pad_prompts_left(inputs, 5, pad_id=0)
    assert padded["input_ids"].tolist() == [[0, 0, 5, 6, 7], [0, 0, 0, 8, 9]]
    assert padded["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert padded["mm_token_type_ids"].tolist() == [[0, 0, 0, 1, 0], [0, 0, 0, 1, 0]]
    assert padded["pixel_values"].shape == (8, 4)
    assert pad_prompts_left(padded, 4, pad_id=0)["input_ids"].shape == (2, 5)  # never cut


def test_token_budget_from_free_memory_for_the_8b_shape():
    text = qwen3_vl_8b_config().text_config
    assert kv_bytes_per_token(text, dtype_bytes=2) == 144 * 1024  # DESIGN.md: 144 KiB per token in bf16
    free = 60 * 2**30  # an 80 GB GPU after the 17.5 GB model and the CUDA context
    budget = token_budget(free, 144 * 1024, batch_size=32, max_new_tokens=128)
    cache_tokens = int(free * (1 - schema.GPU_MEMORY_HEADROOM)) // (144 * 1024)
    assert budget == cache_tokens - 32 * (128 + schema.PROMPT_TEXT_ALLOWANCE) == 319_488
    assert token_budget(2**20, 144 * 1024, 32, 128) == schema.MIN_BATCH_TOKEN_BUDGET  # nothing free: one row a call
