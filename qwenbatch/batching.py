"""How the infer stage cuts rows into `generate` calls: pure functions, testable without a model."""

from __future__ import annotations

from typing import Any

from qwenbatch import schema


def plan_batches(tokens: list[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Row positions grouped for `generate`: similar sizes together, each group's padded size in budget.

    Sorting by image tokens cuts the padding that left-padded batches spend compute on, and
    the token budget (rows x longest row) keeps a batch of large images from running out of memory.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    for position in sorted(range(len(tokens)), key=lambda i: tokens[i]):
        grown = len(current) + 1
        if current and (grown > batch_size or grown * tokens[position] > max_batch_tokens):
            groups.append(current)
            current = []
        current.append(position)
    if current:
        groups.append(current)
    return groups


def _power_of_two_at_least(value: int, floor: int = 1) -> int:
    size = floor
    while size < value:
        size *= 2
    return size


def bucket_rows(rows: int, batch_size: int) -> int:
    """Rows a compiled `generate` call is padded to: a power of two, at most `batch_size`.

    A compiled decode step is specialised to its batch and cache shapes; a handful of buckets
    means a handful of compilations, not one per distinct batch.
    """
    return min(_power_of_two_at_least(rows), max(batch_size, rows))


def bucket_length(tokens: int) -> int:
    """Prompt length a compiled call is left-padded to: a power of two, at least `COMPILE_MIN_PROMPT`."""
    return _power_of_two_at_least(tokens, schema.COMPILE_MIN_PROMPT)


def pad_prompts_left(inputs: Any, length: int, pad_id: int) -> Any:
    """Left-pad the processor's token tensors to `length`; pixels and grids are per image and stay.

    Left padding is what batching already adds to shorter prompts, so the text does not change.
    """
    import torch

    extra = length - inputs["input_ids"].shape[1]
    if extra <= 0:
        return inputs
    fills = {"input_ids": pad_id, "attention_mask": 0, "mm_token_type_ids": 0}
    for name, fill in fills.items():
        if name in inputs:
            tensor = inputs[name]
            pad = torch.full((tensor.shape[0], extra), fill, dtype=tensor.dtype, device=tensor.device)
            inputs[name] = torch.cat([pad, tensor], dim=1)
    return inputs


def kv_bytes_per_token(text_config: Any, dtype_bytes: int) -> int:
    """KV cache bytes one token holds: keys and values, every layer (Qwen3-VL-8B in bf16: 144 KiB)."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return 2 * text_config.num_hidden_layers * text_config.num_key_value_heads * head_dim * dtype_bytes


def token_budget(free_bytes: int, kv_per_token: int, batch_size: int, max_new_tokens: int) -> int:
    """`run.max_batch_tokens` from the memory left after the model loaded.

    The budget counts rows x image tokens; each row's cache also holds its text and the new tokens,
    so those come off first. `GPU_MEMORY_HEADROOM` of the free memory stays for activations (the
    vision tower and prefill peak) and fragmentation; splitting a batch on OOM stays the safety net.
    """
    cache_tokens = int(free_bytes * (1 - schema.GPU_MEMORY_HEADROOM)) // kv_per_token
    per_row_text = max_new_tokens + schema.PROMPT_TEXT_ALLOWANCE
    return max(schema.MIN_BATCH_TOKEN_BUDGET, cache_tokens - batch_size * per_row_text)
