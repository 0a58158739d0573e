"""The tiny checkpoint must load and run through the same Auto* path as the real Qwen3-VL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from qwenbatch.tiny import build_tiny_model

EXPECTED_IDS = {
    "<|endoftext|>": 262,
    "<|im_start|>": 263,
    "<|im_end|>": 264,
    "<|vision_start|>": 265,
    "<|vision_end|>": 266,
    "<|image_pad|>": 267,
    "<|video_pad|>": 268,
    "<think>": 269,
    "</think>": 270,
}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def loaded(tiny_path: Path):
    processor = AutoProcessor.from_pretrained(tiny_path)
    model = AutoModelForImageTextToText.from_pretrained(tiny_path).eval()
    return processor, model


def _messages(text: str) -> list[dict]:
    return [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": text}],
        },
    ]


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def test_files_are_safetensors_only(tiny_path: Path) -> None:
    names = {p.name for p in tiny_path.iterdir()}
    assert "model.safetensors" in names and "qwenbatch_tiny.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert not any(n.startswith(".") for n in names)


def test_classes_and_size(loaded) -> None:
    processor, model = loaded
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 2_000_000
    assert model.dtype == torch.float32


def test_special_token_ids_match_config(loaded) -> None:
    processor, model = loaded
    tok, cfg = processor.tokenizer, model.config
    assert {t: tok.convert_tokens_to_ids(t) for t in EXPECTED_IDS} == EXPECTED_IDS
    assert tok.image_token_id == processor.image_token_id == cfg.image_token_id
    assert tok.video_token_id == processor.video_token_id == cfg.video_token_id
    assert tok.vision_start_token_id == cfg.vision_start_token_id
    assert tok.vision_end_token_id == cfg.vision_end_token_id
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert cfg.text_config.vocab_size >= len(tok)
    gen = model.generation_config
    assert gen.eos_token_id == [tok.eos_token_id, tok.pad_token_id]
    assert gen.pad_token_id == tok.pad_token_id and gen.do_sample is False
    # <think> is a plain added token (not skipped on decode), like Qwen3.
    ids = tok("<think>hi</think><|im_end|>").input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "<think>hi</think>"


def test_chat_template(loaded) -> None:
    processor, _ = loaded
    text = processor.apply_chat_template(_messages("Describe."), tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_generate_single_image(loaded) -> None:
    processor, model = loaded
    text = processor.apply_chat_template(_messages("What is this?"), tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[_image(64, 96)], return_tensors="pt", padding=True)
    assert "mm_token_type_ids" in inputs
    n_pad = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert n_pad == inputs["image_grid_thw"].prod().item() // 4
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 1
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 5


def test_generate_batched_left_padding(loaded) -> None:
    processor, model = loaded
    processor.tokenizer.padding_side = "left"
    try:
        texts = [
            processor.apply_chat_template(_messages(q), tokenize=False, add_generation_prompt=True)
            for q in ("Hi?", "A much longer question about this picture?")
        ]
        images = [_image(64, 96, seed=1), _image(160, 48, seed=2)]
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = "right"
    assert inputs["image_grid_thw"].shape == (2, 3)
    assert not torch.equal(inputs["image_grid_thw"][0], inputs["image_grid_thw"][1])
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left padded
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2


def test_deterministic_and_idempotent(tmp_path: Path, tiny_path: Path) -> None:
    other = build_tiny_model(tmp_path / "again")
    a, b = (load_file(p / "model.safetensors") for p in (tiny_path, other))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    different = load_file(build_tiny_model(tmp_path / "seed1", seed=1) / "model.safetensors")
    assert any(not torch.equal(a[k], different[k]) for k in a)

    mtimes = {p.name: p.stat().st_mtime_ns for p in other.iterdir()}
    assert build_tiny_model(other) == other
    assert {p.name: p.stat().st_mtime_ns for p in other.iterdir()} == mtimes


def test_incomplete_build_is_redone(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "ckpt")
    (path / "config.json").unlink()
    (path / "qwenbatch_tiny.json").unlink()
    build_tiny_model(path)
    assert (path / "config.json").exists() and (path / "qwenbatch_tiny.json").exists()
