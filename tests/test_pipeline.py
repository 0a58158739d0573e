"""End to end on a local Ray with the tiny model: one row per input, the schema, and fidelity.

Fidelity: greedy fp32 text written by the pipeline equals a plain one-image-at-a-time
transformers call (processor + generate on the original image), token for token.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch
from PIL import Image

from qwenbatch import schema
from qwenbatch.pipeline import run
from tests.helpers import job_config, read_output, write_images, write_manifest

ROWS = 54
MAX_NEW_TOKENS = 8
QUESTIONS = ["What is in the picture?", "Which colour dominates?", "Is it day or night?"]
OBJECTS = ["cat", "car", "tree"]
CUSTOM = "Is there a {object} here? Answer for image {id}."
BUDGET = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64}  # tests.helpers.job_config's pixel budget


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    folder = tmp_path_factory.mktemp("e2e")
    paths = write_images(folder / "images", ROWS)
    rows = {
        f"row-{i:03d}": {
            "id": f"row-{i:03d}",
            "image": str(path),
            "question": QUESTIONS[i % 3],
            "object": OBJECTS[i % 3],
            "shard": i % 5,
        }
        for i, path in enumerate(paths)
    }
    return write_manifest(folder / "manifest.parquet", list(rows.values())), rows


@pytest.fixture(scope="module")
def reference(tiny_model: Path):
    """The plain transformers loop, one image at a time, exactly as a tutorial would write it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32).eval()

    def answer(image_path: str, text: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image = Image.open(image_path).convert("RGB")
        inputs = processor(text=[chat], images=[image], return_tensors="pt", size=BUDGET)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    return answer


def run_task(tiny_model: Path, dataset, tmp_path: Path, task: dict) -> pa.Table:
    manifest, _ = dataset
    config = job_config(
        tiny_model, manifest, tmp_path / "out", task=task, generation={"max_new_tokens": MAX_NEW_TOKENS}
    )
    result = run(config)
    assert result.succeeded, result.summary
    return read_output(tmp_path / "out")


def check_rows(table: pa.Table, rows: dict[str, dict], task: str) -> dict[str, dict]:
    assert table.num_rows == len(rows)
    by_id = {row["id"]: row for row in table.to_pylist()}
    assert set(by_id) == set(rows), "every input row exactly once"
    for name in schema.OUTPUT_COLUMNS:
        assert name in table.column_names
    for field in schema.OUTPUT_FIELDS:
        assert table.schema.field(field.name).type == field.type
    for carried in ("image", "question", "object", "shard"):
        assert carried in table.column_names
    for row_id, row in by_id.items():
        assert row["status"] == schema.OK, row["error"]
        assert row["error"] is None
        assert row["task"] == task
        assert row["shard"] == rows[row_id]["shard"]
        assert row["width"] % 32 == 0 and row["height"] % 32 == 0
        assert row["image_tokens"] == row["width"] * row["height"] // 1024
        assert 4 <= row["image_tokens"] <= 64
        assert row["input_tokens"] > row["image_tokens"]
        assert 1 <= row["output_tokens"] <= MAX_NEW_TOKENS
        assert row["finish_reason"] in (schema.FINISH_STOP, schema.FINISH_LENGTH)
        if row["finish_reason"] == schema.FINISH_LENGTH:
            assert row["output_tokens"] == MAX_NEW_TOKENS
    assert len({row["run_id"] for row in by_id.values()}) == 1
    return by_id


def test_caption_matches_plain_transformers(tiny_model, ray_local, dataset, reference, tmp_path):
    from transformers import AutoProcessor

    _, rows = dataset
    by_id = check_rows(run_task(tiny_model, dataset, tmp_path, {"kind": "caption"}), rows, "caption")
    instruction = schema.DEFAULT_PROMPTS["caption"]
    image_processor = AutoProcessor.from_pretrained(tiny_model).image_processor
    for row_id, row in by_id.items():
        assert row["text"] == reference(rows[row_id]["image"], instruction), row_id
        # What the model saw is what its own processor makes of the original image.
        image = Image.open(rows[row_id]["image"]).convert("RGB")
        grid = image_processor(images=[image], size=BUDGET, return_tensors="pt")["image_grid_thw"][0]
        assert (row["height"], row["width"]) == (int(grid[1]) * 16, int(grid[2]) * 16), row_id


def test_vqa_matches_plain_transformers(tiny_model, ray_local, dataset, reference, tmp_path):
    _, rows = dataset
    by_id = check_rows(run_task(tiny_model, dataset, tmp_path, {"kind": "vqa"}), rows, "vqa")
    for row_id, row in by_id.items():
        assert row["text"] == reference(rows[row_id]["image"], rows[row_id]["question"]), row_id


def test_custom_template_matches_plain_transformers(tiny_model, ray_local, dataset, reference, tmp_path):
    _, rows = dataset
    by_id = check_rows(run_task(tiny_model, dataset, tmp_path, {"kind": "custom", "prompt": CUSTOM}), rows, "custom")
    for row_id, row in by_id.items():
        prompt = CUSTOM.format(object=rows[row_id]["object"], id=row_id)
        assert row["text"] == reference(rows[row_id]["image"], prompt), row_id
