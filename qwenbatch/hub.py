"""Where the checkpoint comes from: processor and model loading, safely, once per process."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import ProcessorMixin

    from qwenbatch.config import ModelConfig

# Checkpoint code never runs and pickled weights are refused: safetensors only.
SAFE_LOAD = {"trust_remote_code": False, "use_safetensors": True}


@lru_cache(maxsize=4)
def load_processor(name: str, revision: str | None) -> ProcessorMixin:
    """One processor per worker process; CPU stages and the GPU actor each call this."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(name, revision=revision, trust_remote_code=False)
    processor.tokenizer.padding_side = "left"  # batched generation is wrong with right padding
    return processor


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_kwargs(config: ModelConfig, device: str, gpus: int = 1) -> dict[str, Any]:
    """`from_pretrained` arguments. With `gpus > 1` accelerate splits the layers over the GPUs Ray gave
    the actor (its CUDA_VISIBLE_DEVICES); the vision tower and the embeddings come first, on the first
    GPU, which is `model.device`, where the inputs go; accelerate's hooks move activations onward."""
    kwargs = dict(SAFE_LOAD, revision=config.revision, dtype=resolve_dtype(config.dtype, device))
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    if device.startswith("cuda") and gpus > 1:
        kwargs["device_map"] = "auto"
    return kwargs


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but this worker sees no GPU")
    return device


def load_model(config: ModelConfig, device: str, gpus: int = 1) -> torch.nn.Module:
    """Load the model for generation on `device` ("auto", "cuda" or "cpu"); with `gpus > 1`,
    accelerate shards it across them."""
    from transformers import AutoModelForImageTextToText

    device = pick_device(device)
    kwargs = load_kwargs(config, device, gpus)
    model = AutoModelForImageTextToText.from_pretrained(config.name, **kwargs)
    if "device_map" not in kwargs:
        model = model.to(device)
    return model.eval()
