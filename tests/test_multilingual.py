"""Chinese, Japanese, emoji and mixed-script prompts through the pipeline, on Qwen's real tokenizer.

Each row's instruction reaches the model intact (the same prompt tokens and the same greedy text as a plain
transformers call given that instruction), and every text column comes back unchanged.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwenbatch import schema
from qwenbatch.pipeline import run
from tests.helpers import job_config, qwen_bpe, read_output, write_images, write_manifest

MAX_NEW_TOKENS = 6
BUDGET = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64}  # tests.helpers.job_config's pixel budget
TEXTS = [
    "这张图片里有什么？请用中文回答。",
    "この画像には猫が何匹いますか？",
    "🐱🐈‍⬛👨‍👩‍👧‍👦🇯🇵🏳️‍🌈",
    "Mixed: 中文, 日本語, 한국어, русский, العربية, Ελληνικά — and 🦩!",
    "Cafe\u0301 naïve: 鰯 龘 𠮷",
]
# <|im_start|> user \n <|vision_start|> ... <|vision_end|> ... <|im_end|> \n <|im_start|> assistant \n
CHAT_TOKENS = 10
TEMPLATE = "描述 {object}（{question}）の写真 🖼️ {prompt}"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("multilingual")
    paths = write_images(folder / "images", len(TEXTS))
    rows = [
        {
            "id": f"行-{i}-🐱",
            "image": str(path),
            "question": text,
            "prompt": TEXTS[-1 - i],
            "object": ["猫", "犬", "🦩", "Katze", "고양이"][i],
        }
        for i, (path, text) in enumerate(zip(paths, TEXTS, strict=True))
    ]
    return write_manifest(folder / "manifest.parquet", rows), rows


@pytest.fixture(scope="module")
def reference(tiny_model: Path):
    """The plain transformers call: (input tokens, greedy text) for an image and an instruction."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32).eval()

    def answer(image_path: str, text: str) -> tuple[int, str]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image = Image.open(image_path).convert("RGB")
        inputs = processor(text=[chat], images=[image], return_tensors="pt", size=BUDGET)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        text_out = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        return inputs["input_ids"].shape[1], text_out

    return answer


@pytest.mark.parametrize(
    ("task", "instruction"),
    [
        ({"kind": "vqa"}, lambda row: row["question"]),
        ({"kind": "custom", "prompt": TEMPLATE}, lambda row: TEMPLATE.format(**row)),
    ],
    ids=["vqa-question", "custom-template"],
)
def test_multilingual_prompts_round_trip(tiny_model, ray_local, dataset, reference, tmp_path, task, instruction):
    manifest, rows = dataset
    bpe = qwen_bpe()
    generation = {"max_new_tokens": MAX_NEW_TOKENS}
    config = job_config(tiny_model, manifest, tmp_path / "out", task=task, generation=generation)
    result = run(config)
    assert result.succeeded, result.summary
    by_id = {row["id"]: row for row in read_output(tmp_path / "out").to_pylist()}
    assert set(by_id) == {row["id"] for row in rows}
    for row in rows:
        got = by_id[row["id"]]
        assert got[schema.STATUS] == schema.OK, got[schema.ERROR]
        for column in ("image", "question", "prompt", "object"):
            assert got[column] == row[column]
        input_tokens, text = reference(row["image"], instruction(row))
        assert (got[schema.INPUT_TOKENS], got[schema.TEXT]) == (input_tokens, text), row["id"]
        # The instruction is Qwen's BPE of it; the chat around it is 10 tokens and the image's pads.
        words = len(bpe.encode(unicodedata.normalize("NFC", instruction(row))))
        assert got[schema.INPUT_TOKENS] == CHAT_TOKENS + got[schema.IMAGE_TOKENS] + words, row["id"]
