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

from qwenbatch.tiny_tokenizer import ADDED_TOKENS, build_qwen_tokenizer

__all__ = ["THINKING_ANSWER", "THINKING_REASONING", "build_tiny_model", "thinking_script", "tiny_in_memory"]

MARKER = "qwenbatch_tiny.json"
VERSION = 2
EMBEDDING_ROWS = 151_936  # Qwen3-VL pads its 151,669 tokens to this many embedding and lm_head rows

INSTRUCT_PROMPT = "<|im_start|>assistant\n"
THINKING_PROMPT = "<|im_start|>assistant\n<think>\n"  # the Thinking variants' generation prompt

# What the thinking variant writes after its generation prompt, whatever the image and question:
# reasoning in two scripts, `</think>`, then an answer whose last character, after a space, spans 3 tokens.
THINKING_REASONING = "The user asks what is in the picture: 動物を数える."
THINKING_ANSWER = "猫が一匹います 🐱"
SCRIPT_EMBED_NORM = 4.0  # the script's embedding rows outweigh what the random layers add to them
SCRIPT_HEAD_GAIN = 2.0  # logit of the scripted token ~ 2 x sqrt(hidden); random rows stay below 1


def chat_template(generation_prompt: str) -> str:
    """Qwen3-VL's chat template restricted to system/user/assistant turns with text, image and video parts
    (tool calling omitted); renders identically for those inputs. Instruct and Thinking differ in the
    generation prompt (Thinking opens `<think>`); qwenbatch renders no assistant turns, whose earlier
    reasoning the real Thinking template would drop."""
    return (
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
        "{%- if add_generation_prompt %}{{- '" + generation_prompt.replace("\\n", "\\\\n") + "' }}{%- endif %}"
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


def _build_processor(thinking: bool) -> Qwen3VLProcessor:
    """Qwen's tokenizer + Qwen2VL image / Qwen3VL video processors configured like Qwen3-VL."""
    image_processor = Qwen2VLImageProcessor(size=IMAGE_SIZE, **VISION_KWARGS)
    video_processor = Qwen3VLVideoProcessor(size=VIDEO_SIZE, fps=2, min_frames=4, max_frames=768, **VISION_KWARGS)
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=build_qwen_tokenizer(),
        video_processor=video_processor,
        chat_template=chat_template(THINKING_PROMPT if thinking else INSTRUCT_PROMPT),
    )


def _build_config(tokenizer: Qwen2Tokenizer, text_layers: int = 2) -> Qwen3VLConfig:
    """Tiny dims, but every structural feature of Qwen3-VL (interleaved MRoPE, deepstack, GQA), Qwen's
    vocabulary, and head_dim 32 (the real one is 128; vLLM's CPU attention is reported to refuse smaller).
    `text_layers`: the text model's depth (2; the 8B has 36)."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token, _ in ADDED_TOKENS}
    hidden, head_dim = 32, 32
    text_config = {
        "vocab_size": EMBEDDING_ROWS,
        "hidden_size": hidden,
        "intermediate_size": 64,
        "num_hidden_layers": text_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": head_dim,
        "max_position_embeddings": 262144,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            # Sums to head_dim // 2, as the real [24, 20, 20] sums to 128 // 2.
            "mrope_section": [6, 5, 5],
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


def thinking_script(tokenizer: Qwen2Tokenizer) -> list[int]:
    """The ids the thinking variant generates: its reasoning, `</think>`, its answer, then `<|im_end|>`."""
    text = f"{THINKING_REASONING}\n</think>\n\n{THINKING_ANSWER}"
    return [*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id]


def _script_weights(model: Qwen3VLForConditionalGeneration, chain: list[int]) -> None:
    """Make greedy decoding walk `chain`: each token's successor wins, whatever the rest of the prompt.

    Every token but the last gets its own direction (orthonormal, so at most `hidden` of them): its
    embedding row points that way, long enough to outweigh what the random layers add, and the head row
    of its successor reads that way. The layers stay random and run as usual; only these rows change.
    """
    sources = chain[:-1]
    hidden = model.config.text_config.hidden_size
    if len(set(sources)) != len(sources) or len(sources) > hidden:
        raise ValueError(f"a script needs at most {hidden} distinct tokens before its last: {chain}")
    directions = torch.linalg.qr(torch.randn(hidden, hidden))[0].T
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    with torch.no_grad():
        for direction, token, successor in zip(directions, sources, chain[1:], strict=False):
            embed[token] = SCRIPT_EMBED_NORM * direction
            head[successor] = SCRIPT_HEAD_GAIN * direction


def _build_model(config: Qwen3VLConfig, seed: int, chain: list[int] | None) -> Qwen3VLForConditionalGeneration:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config).to(torch.float32).eval()
        if chain is not None:
            _script_weights(model, chain)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[config.text_config.eos_token_id, config.text_config.pad_token_id],
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    return model


def tiny_in_memory(text_layers: int = 2, seed: int = 0) -> tuple[Qwen3VLForConditionalGeneration, Qwen3VLProcessor]:
    """The tiny model (random weights, float32, on CPU) and its processor, built in memory, never saved.

    `text_layers` sets the text model's depth at the tiny width: 36 is the 8B's, which makes the host time of a
    decode step (Python and dispatch, per layer) the 8B's while its kernels cost next to nothing.
    """
    processor = _build_processor(thinking=False)
    return _build_model(_build_config(processor.tokenizer, text_layers), seed, None), processor


def _marker(seed: int, thinking: bool, answer: str | None = None) -> dict:
    return {"version": VERSION, "seed": seed, "thinking": thinking} | ({"answer": answer} if answer else {})


def _is_complete(path: Path, seed: int, thinking: bool, answer: str | None = None) -> bool:
    """True if `path` holds a finished build of this version, seed and variant (the marker is written last)."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == _marker(seed, thinking, answer)


def build_tiny_model(path: str | Path, seed: int = 0, thinking: bool = False, answer: str | None = None) -> Path:
    """Build and save a tiny random Qwen3-VL checkpoint at `path`; returns the path.

    `thinking` builds the Thinking variant: its chat template opens `<think>` in the generation prompt,
    and its weights are set so that greedy decoding writes `thinking_script` (THINKING_REASONING,
    `</think>`, THINKING_ANSWER) whatever the image, which makes the reasoning split testable end to end.
    `answer` (an instruct model) sets them so that it writes `answer` whatever the image and prompt (its
    tokens, the generation prompt's last among them, must be distinct): a known answer end to end.

    Idempotent: if `path` already holds a complete checkpoint built by this function (same version, seed
    and variant, per the `qwenbatch_tiny.json` marker), it is returned without rebuilding. Files are staged
    in a temporary sibling directory and moved in with the marker last, so an interrupted build is redone.
    """
    path = Path(path)
    if _is_complete(path, seed, thinking, answer):
        return path
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.tmp") as tmp:
        processor = _build_processor(thinking)
        processor.save_pretrained(tmp)
        tokenizer = processor.tokenizer
        # The script starts from the generation prompt's last token, the newline after `<think>`.
        start = tokenizer(THINKING_PROMPT, add_special_tokens=False).input_ids[-1]
        chain = [start, *thinking_script(tokenizer)] if thinking else None
        if answer is not None and not thinking:
            last = tokenizer(INSTRUCT_PROMPT, add_special_tokens=False).input_ids[-1]
            chain = [last, *tokenizer(answer, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        model = _build_model(_build_config(tokenizer), seed, chain)
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
        (path / MARKER).write_text(json.dumps(_marker(seed, thinking, answer)) + "\n")
    return path
