"""The tiny checkpoint must load and run through the same Auto* path as the real Qwen3-VL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from qwenbatch.tiny import THINKING_ANSWER, THINKING_REASONING, build_tiny_model, thinking_script
from tests.helpers import qwen_bpe

# Qwen3-VL's added tokens at their real ids (DESIGN.md; the checkpoint's tokenizer_config.json).
EXPECTED_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
    "<tool_response>": 151665,
    "</tool_response>": 151666,
    "<think>": 151667,
    "</think>": 151668,
}
NOT_SPECIAL_FROM = 151657  # from <tool_call> on, the added tokens are plain text to `skip_special_tokens`

# Well-known Qwen token ids: the default system turn, and a few words.
KNOWN_IDS = {
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n": [151644, 8948, 198, 2610, 525, 264, 10950]
    + [17847, 13, 151645, 198],
    "Hello world": [9707, 1879],
    "<|im_start|>user\n": [151644, 872, 198],
    "<|im_start|>assistant\n": [151644, 77091, 198],
    "\n\n": [271],
}

# Multi-byte text for the BPE: CJK, Japanese kana, Hangul, Cyrillic, Arabic, emoji (ZWJ sequences and flags
# included), combining marks (NFC-normalised first, like Qwen), code whitespace and a long repeat.
TEXTS = [
    "这张图片里有什么？请用中文回答。",
    "この画像には猫が二匹写っています。",
    "한국어 텍스트와 English 혼합",
    "Привет, мир! مرحبا بالعالم",
    "🐱🐈‍⬛ 👨‍👩‍👧‍👦 🇯🇵🏳️‍🌈 🦩🪐",
    "Cafe\u0301 naïve Ünïcödé",
    "def f(x):\n    return x  # 2 spaces\r\n\t\tok\n\n\n",
    "鰯 龘 𠮷 — rare characters",
    "x" * 2000,
]


@pytest.fixture(scope="module")
def tiny_path(tiny_model: Path) -> Path:
    return tiny_model


@pytest.fixture(scope="module")
def thinking_path(tiny_thinking_model: Path) -> Path:
    return tiny_thinking_model


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
    assert type(processor.tokenizer).__name__ == "Qwen2Tokenizer"
    assert model.dtype == torch.float32
    text = model.config.text_config
    assert text.vocab_size == 151936 and text.hidden_size == 32
    assert model.get_input_embeddings().weight.shape == (151936, 32)
    assert model.get_output_embeddings().weight.shape == (151936, 32)
    assert text.head_dim == 32 and text.rope_parameters["mrope_section"] == [6, 5, 5]
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    embeddings = 2 * 151936 * 32
    assert 50_000 < sum(p.numel() for p in model.parameters()) - embeddings < 500_000


def test_special_token_ids_match_config(loaded) -> None:
    processor, model = loaded
    tok, cfg = processor.tokenizer, model.config
    assert {t: tok.convert_tokens_to_ids(t) for t in EXPECTED_IDS} == EXPECTED_IDS
    assert len(tok) == 151669
    special = {token.content for token in tok.added_tokens_decoder.values() if token.special}
    assert special == {t for t, i in EXPECTED_IDS.items() if i < NOT_SPECIAL_FROM}
    assert tok.image_token_id == processor.image_token_id == cfg.image_token_id == 151655
    assert tok.video_token_id == processor.video_token_id == cfg.video_token_id == 151656
    assert tok.vision_start_token_id == cfg.vision_start_token_id == 151652
    assert tok.vision_end_token_id == cfg.vision_end_token_id == 151653
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert cfg.text_config.vocab_size >= len(tok)
    gen = model.generation_config
    assert gen.eos_token_id == [151645, 151643]
    assert gen.pad_token_id == 151643 and gen.do_sample is False
    # <think> is a plain added token (not skipped on decode), like Qwen3.
    ids = tok("<think>hi</think><|im_end|>").input_ids
    assert ids == [151667, 6023, 151668, 151645]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>hi</think>"


def test_tokenizer_is_qwens_bpe(loaded) -> None:
    """Known Qwen ids, and the same ids as tiktoken's own BPE over the same ranks, for every script."""
    import unicodedata

    tok = loaded[0].tokenizer
    for text, ids in KNOWN_IDS.items():
        assert tok(text).input_ids == ids, text
    reference = qwen_bpe()
    for text in TEXTS:
        normalised = unicodedata.normalize("NFC", text)
        ids = tok(text).input_ids
        assert ids == reference.encode(normalised), text
        assert tok.decode(ids) == normalised
    assert len(tok("🐱 🦩").input_ids) == 4  # a cat is one token; a flamingo after a space is three


def test_chat_template(loaded) -> None:
    processor, _ = loaded
    text = processor.apply_chat_template(_messages("Describe."), tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = processor.tokenizer(text).input_ids
    assert ids[:3] == [151644, 8948, 198] and ids[-3:] == [151644, 77091, 198]


def test_thinking_variant_writes_its_script(thinking_path: Path) -> None:
    """The Thinking template opens <think>; greedy decoding then writes the script for any image and question."""
    processor = AutoProcessor.from_pretrained(thinking_path)
    model = AutoModelForImageTextToText.from_pretrained(thinking_path).eval()
    text = processor.apply_chat_template(_messages("这是什么？"), tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n")
    script = thinking_script(processor.tokenizer)
    assert script[-1] == 151645 and 151668 in script
    for question, image in (("这是什么？", _image(64, 96)), ("What is it? 🐱", _image(160, 48, seed=3))):
        chat = processor.apply_chat_template(_messages(question), tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[chat], images=[image], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=len(script) + 5, do_sample=False)
        generated = out[0, inputs["input_ids"].shape[1] :].tolist()
        assert generated == script
        decoded = processor.decode(generated, skip_special_tokens=True)
        assert decoded == f"{THINKING_REASONING}\n</think>\n\n{THINKING_ANSWER}"


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

    assert "<think>" not in (other / "chat_template.jinja").read_text()
    build_tiny_model(other, thinking=True)  # the other variant is a rebuild, not the checkpoint already there
    assert "<think>" in (other / "chat_template.jinja").read_text()


def test_incomplete_build_is_redone(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "ckpt")
    (path / "config.json").unlink()
    (path / "qwenbatch_tiny.json").unlink()
    build_tiny_model(path)
    assert (path / "config.json").exists() and (path / "qwenbatch_tiny.json").exists()
