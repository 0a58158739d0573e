"""Where the checkpoint comes from: processor and model loading, safely, once per process."""

from __future__ import annotations

import difflib
import os
import socket
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from qwenbatch.config import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import ProcessorMixin

    from qwenbatch.config import ModelConfig

# Checkpoint code never runs and pickled weights are refused: safetensors only.
SAFE_LOAD = {"trust_remote_code": False, "use_safetensors": True}
HUB_PROBE_TIMEOUT_S = 5.0  # connecting to the hub once, on the driver, before Ray starts
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def require_model(config: ModelConfig) -> None:
    """Fail in one line, on the driver and before Ray starts, when no replica could get the checkpoint.

    A local folder must exist (a folder beside it with a close name is suggested). A hub id must be in the
    local Hugging Face cache, or the hub must be reachable for the replicas to download it: otherwise every
    replica would fail later, each with a long traceback after Ray started. The cache is the one HF_HOME
    (or HF_HUB_CACHE) names.
    """
    name = config.name
    if os.path.isdir(name):
        return
    if _looks_local(name):
        problem = "not a folder" if os.path.exists(name) else "no such folder"
        raise ConfigError(f"model: {name}: {problem}{_guess(name)}")
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name, "config.json", revision=config.revision)
    except HFValidationError:
        raise ConfigError(f"model: {name!r} is neither a local checkpoint folder nor a hub id") from None
    if isinstance(cached, str):
        return
    where = f"the local Hugging Face cache ({constants.HF_HUB_CACHE}, from HF_HOME)"
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"model: {name} is not in {where} and HF_HUB_OFFLINE forbids downloading it: download it into that "
            "cache on a machine with network, point HF_HOME at a cache that holds it, or give a local folder"
        )
    if not _hub_reachable(constants.ENDPOINT):
        raise ConfigError(
            f"model: {name} is not in {where} and {constants.ENDPOINT} cannot be reached to download it: point "
            "HF_HOME at a cache that holds it or give a local folder (HF_HUB_OFFLINE=1 never tries the network)"
        )


def _looks_local(name: str) -> bool:
    """A path, not a hub id (`org/name`): absolute or relative by its start, more than one `/`, or a first
    segment that is a folder here (`demo_out/modle` beside `demo_out/`)."""
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        return True
    first, sep, _ = name.partition(os.sep)
    return bool(sep) and os.path.isdir(first)


def _guess(name: str) -> str:
    """`; did you mean <sibling>?` for a folder beside the one named with a close name, else nothing."""
    parent, missing = os.path.split(name.rstrip(os.sep))
    try:
        siblings = [entry.name for entry in os.scandir(parent or ".") if entry.is_dir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(missing, siblings, n=1)
    return f"; did you mean {os.path.join(parent, close[0])}?" if close else ""


def _hub_reachable(endpoint: str) -> bool:
    """Whether a connection to the hub opens; behind a proxy the proxy decides, so it is not probed."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


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
