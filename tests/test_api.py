"""`qwenbatch.process` on users' own Ray Datasets: one row out per row in, the right statuses, and the
same text `qwenbatch run` writes for the same images (the same stages, the same pixels)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import yaml

import qwenbatch
from qwenbatch import schema
from qwenbatch.pipeline import run
from tests.helpers import encode, job_config, job_data, noise_image, read_output, write_images, write_manifest

MAX_SOURCE_PIXELS = 1_500_000  # the 1600x1200 image of MIXED_SIZES is over it: a load_error by the pixel guard
QUESTIONS = ["What is in the picture?", "Which colour dominates?", None]  # None: a vqa row without a question


def by(rows: list[dict], key: str) -> dict:
    return {row[key]: row for row in rows}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images of varied sizes and modes, and one the model refuses (aspect ratio over 200)."""
    folder = tmp_path_factory.mktemp("api") / "images"
    write_images(folder, 6)  # JPEG and PNG; sizes from 1x1 to 1600x1200
    (folder / "grey.png").write_bytes(encode(noise_image(120, 90, 7, "L"), "PNG"))
    (folder / "alpha.png").write_bytes(encode(noise_image(100, 80, 8, "RGBA"), "PNG"))
    (folder / "sliver.png").write_bytes(encode(noise_image(1000, 4, 9), "PNG"))
    return folder


def cli_rows(tiny_model: Path, images: list[Path], tmp_path: Path, task: dict) -> dict[str, dict]:
    """What `qwenbatch run` writes for these images (a manifest of their paths), by path."""
    rows = [{"id": path.name, "image": str(path), "question": QUESTIONS[i % 3]} for i, path in enumerate(images)]
    manifest = write_manifest(tmp_path / "manifest" / "m.parquet", rows)
    config = job_config(
        tiny_model,
        manifest,
        tmp_path / "cli",
        task=task,
        image={"max_source_pixels": MAX_SOURCE_PIXELS, "allowed_prefixes": [str(images[0].parent)]},
    )
    assert run(config).summary["output"]["rows"] == len(images)
    return by(read_output(tmp_path / "cli").to_pylist(), "image")


def test_read_images_matches_the_cli(tiny_model, ray_local, folder, tmp_path):
    import ray.data

    images = sorted(folder.iterdir())
    expected = cli_rows(tiny_model, images, tmp_path, {"kind": "caption"})
    settings = job_data(tiny_model, "unused", "unused", image={"max_source_pixels": MAX_SOURCE_PIXELS})
    dataset = ray.data.read_images(str(folder), include_paths=True)
    rows = qwenbatch.process(dataset, {k: settings[k] for k in ("model", "generation", "image", "run")}).take_all()

    assert len(rows) == len(images)
    got = by(rows, "path")
    assert set(got) == set(expected)
    assert "image" not in rows[0], "decoded pixels are not carried into the output"
    refused = {str(folder / "img_0004.jpeg"): "decompression bomb guard", str(folder / "sliver.png"): "aspect ratio"}
    assert {path: (row["status"], row["error"]) for path, row in got.items() if path not in refused} == {
        str(path): (schema.OK, None) for path in images if str(path) not in refused
    }
    for path, reason in refused.items():  # 1600x1200: over the pixel guard; 1000x4: the model refuses it
        assert got[path]["status"] == schema.LOAD_ERROR and reason in got[path]["error"], got[path]["error"]
    for path, row in got.items():
        cli = expected[path]
        assert row["status"] == cli["status"], path
        assert (row["text"], row["width"], row["height"]) == (cli["text"], cli["width"], cli["height"]), path
        assert (row["input_tokens"], row["output_tokens"]) == (cli["input_tokens"], cli["output_tokens"]), path
        assert row["task"] == "caption" and row["model"] == str(tiny_model)


def test_bytes_from_items_chained(tiny_model, ray_local, folder, tmp_path):
    """Encoded bytes in `image`, a YAML job config (its input and output ignored), a user stage after it."""
    import ray.data

    images = sorted(folder.iterdir())[:6]
    expected = cli_rows(tiny_model, images, tmp_path, {"kind": "vqa"})
    items = [
        {"key": path.name, "image": path.read_bytes(), "question": QUESTIONS[i % 3]} for i, path in enumerate(images)
    ]
    items.append({"key": "truncated", "image": images[1].read_bytes()[:200], "question": "What?"})
    items.append({"key": "not-an-image", "image": b"plain text, not an image", "question": "What?"})
    items.append({"key": "cut-pdf", "image": b"%PDF-1.4 the rest is missing", "question": "What?"})
    output = tmp_path / "never-written"
    config_file = tmp_path / "job.yaml"
    config_file.write_text(yaml.safe_dump(job_data(tiny_model, tmp_path / "nowhere", output, task={"kind": "vqa"})))

    def shout(batch: pa.Table) -> pa.Table:  # the user's own stage, chained on the returned Dataset
        texts = [None if text is None else text.upper() for text in batch.column("text").to_pylist()]
        return batch.append_column("shout", pa.array(texts, pa.string()))

    dataset = qwenbatch.process(ray.data.from_items(items), str(config_file))
    rows = by(dataset.map_batches(shout, batch_format="pyarrow").take_all(), "key")

    assert len(rows) == len(items) and set(rows) == {item["key"] for item in items}
    assert not output.exists(), "process writes nothing of its own"
    assert rows["truncated"]["status"] == schema.LOAD_ERROR
    assert rows["truncated"]["error"].startswith("cannot decode")
    assert rows["not-an-image"] == rows["not-an-image"] | {"status": schema.LOAD_ERROR, "text": None, "shout": None}
    assert rows["not-an-image"]["error"] == "not a recognised image file"
    assert rows["cut-pdf"]["status"] == schema.LOAD_ERROR  # bytes that open as a PDF are read as one
    assert rows["cut-pdf"]["error"] == "cannot open PDF: the file is truncated (no end-of-file marker)"
    for i, path in enumerate(images):
        row, cli = rows[path.name], expected[str(path)]
        assert row["status"] == cli["status"], path
        if QUESTIONS[i % 3] is None:
            assert row["status"] == schema.PROMPT_ERROR
            assert row["error"] == "vqa row has no question in column 'question'"
        elif row["status"] == schema.OK:
            assert row["text"] == cli["text"] and row["shout"] == cli["text"].upper(), path
        assert row["question"] == QUESTIONS[i % 3] and "image" not in row
    assert {row["run_id"] for row in rows.values()} == {rows["truncated"]["run_id"]}


def test_locations_need_allowed_prefixes(tiny_model, ray_local, folder):
    """Paths in `image` are read only under image.allowed_prefixes, which process has no manifest folder to
    default to: by default it reads bytes and arrays (the tests above), and no location."""
    import ray.data

    path = str(sorted(folder.iterdir())[0])
    settings = job_data(tiny_model, "unused", "unused")
    config = {k: settings[k] for k in ("model", "run")}
    [row] = qwenbatch.process(ray.data.from_items([{"image": path}]), config).take_all()
    assert row["image"] == path, "a location is carried through"
    assert row["status"] == schema.LOAD_ERROR
    assert row["error"] == "location is outside image.allowed_prefixes (none)"


def test_config_errors_are_one_line(tmp_path):
    from qwenbatch.config import ConfigError

    with pytest.raises(ConfigError, match=r"^config: run.batch_size: Input should be greater than or equal to 1$"):
        qwenbatch.process(None, {"model": "x", "run": {"batch_size": 0}})
    with pytest.raises(ConfigError, match=r"^model: /nowhere/model: no such folder$"):
        qwenbatch.process(None, {"model": "/nowhere/model"})
