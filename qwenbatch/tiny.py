"""Tiny random Qwen3-VL checkpoint for offline tests.

The checkpoint is saved in the same layout as `Qwen/Qwen3-VL-8B-Instruct`, so it loads through the
exact production path (`AutoProcessor` / `AutoModelForImageTextToText.from_pretrained`, safetensors,
no remote code) while being small enough for CPU unit tests.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)
from transformers.utils import logging as hf_logging

__all__ = ["build_tiny_model"]

MARKER = "qwenbatch_tiny.json"
VERSION = 1

# Same relative order as Qwen's vocab; `<think>`/`</think>` are plain added tokens, as in Qwen3.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
NORMAL_ADDED_TOKENS = ["<think>", "</think>"]
# A few fixed merges so BPE actually merges something; results get ids right after the 256 bytes.
MERGES = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("Ġt", "he")]

# Qwen3-VL-Instruct's chat template restricted to system/user/assistant turns with
# text, image and video parts (tool calling omitted); renders identically for those inputs.
CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].content is string %}{{- messages[0].content }}"
    "{%- else %}{%- for content in messages[0].content %}"
    "{%- if 'text' in content %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set image_count = namespace(value=0) %}"
    "{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content.text }}"
    "{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content_item in message.content %}"
    "{%- if 'text' in content_item %}{{- content_item.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Vision preprocessing exactly as in the real checkpoint's preprocessor configs.
VISION_KWARGS = {
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5] * 3,
    "image_std": [0.5] * 3,
}
IMAGE_SIZE = {"shortest_edge": 65536, "longest_edge": 16777216}
VIDEO_SIZE = {"shortest_edge": 4096, "longest_edge": 25165824}


def _byte_symbols() -> list[str]:
    """GPT-2 byte->unicode table, in byte order: the 256 base symbols of a byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _build_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE wrapped in the same class (and hence pre-tokenizer) Qwen checkpoints load with."""
    vocab = {sym: i for i, sym in enumerate(_byte_symbols())}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    # Qwen2Tokenizer adds its named tokens at init in its own order; start with only `<|endoftext|>`
    # (its default eos/pad) so the added tokens get ids in Qwen's order, then name the rest.
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(MERGES),
        unk_token=None,
        bos_token=None,
        model_max_length=262144,
        errors="replace",
    )
    tokenizer.add_special_tokens({"extra_special_tokens": SPECIAL_TOKENS})
    tokenizer.add_tokens(NORMAL_ADDED_TOKENS)
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
    return tokenizer


def _build_processor() -> Qwen3VLProcessor:
    """Tokenizer + Qwen2VL image / Qwen3VL video processors configured like Qwen3-VL."""
    image_processor = Qwen2VLImageProcessor(size=IMAGE_SIZE, **VISION_KWARGS)
    video_processor = Qwen3VLVideoProcessor(size=VIDEO_SIZE, fps=2, min_frames=4, max_frames=768, **VISION_KWARGS)
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=_build_tokenizer(),
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _build_config(tokenizer: Qwen2Tokenizer) -> Qwen3VLConfig:
    """Tiny dims, but every structural feature of Qwen3-VL (interleaved MRoPE, deepstack, GQA)."""
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64
    hidden, head_dim = 32, 16
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": head_dim,
        "max_position_embeddings": 262144,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            # Sums to head_dim // 2; same proportions as the real [24, 20, 20].
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "dtype": "float32",
    }
    vision_config = {
        "depth": 2,
        "hidden_size": hidden,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": hidden,
        "num_position_embeddings": 576,
        "deepstack_visual_indexes": [0, 1],
    }
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )


def _is_complete(path: Path, seed: int) -> bool:
    """True if `path` holds a finished build of this version and seed (the marker is written last)."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == {"version": VERSION, "seed": seed}


def build_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny random Qwen3-VL checkpoint at `path`; returns the path.

    Idempotent: if `path` already holds a complete checkpoint built by this function (same version and
    seed, per the `qwenbatch_tiny.json` marker), it is returned without rebuilding. Files are staged in a
    temporary sibling directory and moved in with the marker last, so an interrupted build is redone.
    """
    path = Path(path)
    if _is_complete(path, seed):
        return path
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.tmp") as tmp:
        processor = _build_processor()
        processor.save_pretrained(tmp)
        config = _build_config(processor.tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen3VLForConditionalGeneration(config).to(torch.float32).eval()
        model.generation_config = GenerationConfig(
            bos_token_id=config.text_config.bos_token_id,
            eos_token_id=[
                config.text_config.eos_token_id,
                config.text_config.pad_token_id,
            ],
            pad_token_id=config.text_config.pad_token_id,
            do_sample=False,
        )
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # save_pretrained shows a tqdm bar; this builder prints nothing
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        (path / MARKER).unlink(missing_ok=True)
        for item in Path(tmp).iterdir():
            target = path / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        (path / MARKER).write_text(json.dumps({"version": VERSION, "seed": seed}) + "\n")
    return path
