"""A random-weight model with Qwen3-VL-8B-Instruct's exact shape: it times like the real one."""

from __future__ import annotations

from pathlib import Path

# Qwen3-VL-8B-Instruct's shape (DESIGN.md); random weights time exactly like real ones.
QWEN3_VL_8B_TEXT = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 262144,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
}
QWEN3_VL_8B_VISION = {
    "depth": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_heads": 16,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 4096,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [8, 16, 24],
}
QWEN3_VL_8B_PARAMS = 8.77e9
TOKEN_ID_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def qwen3_vl_8b_config(token_ids: dict[str, int] | None = None):
    """The 8B shape; `token_ids` points its special tokens at the tokenizer it will be used with."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(QWEN3_VL_8B_TEXT),
        vision_config=dict(QWEN3_VL_8B_VISION),
        tie_word_embeddings=False,
        **(token_ids or {}),
    )


def count_parameters(config) -> int:
    """Parameters of a model built on the meta device: no memory, exact count."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


def build_random_8b(path: Path, tokenizer_from: Path) -> Path:
    """A random-weight 8B-shaped checkpoint on disk, loadable like the real one.

    Built directly on the GPU in bf16 (no CPU initialisation, no fp32 copy) and saved once; the
    tokenizer and processor come from `tokenizer_from`, and the special token ids follow them.
    """
    import json

    import torch
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    if (path / "model.safetensors.index.json").exists():
        return path
    processor = AutoProcessor.from_pretrained(tokenizer_from)
    tiny = json.loads((tokenizer_from / "config.json").read_text())
    config = qwen3_vl_8b_config({key: tiny[key] for key in TOKEN_ID_KEYS})
    with torch.device("cuda"):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = tiny.get("eos_token_id")
    model.save_pretrained(path, max_shard_size="5GB")
    processor.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path
