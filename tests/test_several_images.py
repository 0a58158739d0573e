"""Several images in one prompt: the `images` list column and PDFs with pdf.mode per_document. Per-image
budgets under image.max_total_pixels, a bad image named, and fidelity with the plain transformers call."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from qwenbatch import schema
from qwenbatch.pdf import opened, render_page
from qwenbatch.pipeline import run
from tests.helpers import PlainTransformers, encode, job_config, noise_image, read_output, write_manifest
from tests.pdfs import make_pdf

MAX_NEW_TOKENS = 8
MIN_PIXELS, MAX_PIXELS = 32 * 32 * 4, 32 * 32 * 64  # tests.helpers.job_config's pixel budget
TOTAL = 32 * 32 * 96  # image.max_total_pixels here: three images get 32 tokens each, two get 48


@pytest.fixture(scope="module")
def reference(tiny_model: Path):
    """The plain transformers call on given PIL images, each at the pixel budget given."""
    plain = PlainTransformers(tiny_model)
    return lambda images, text, max_pixels: plain.answer(
        images, text, {"shortest_edge": MIN_PIXELS, "longest_edge": max_pixels}, MAX_NEW_TOKENS
    )


def test_several_images_in_one_prompt(tmp_path: Path, tiny_model: Path, ray_local, reference) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    paths = []
    for index, size in enumerate([(300, 200), (120, 400), (640, 480), (64, 64)]):
        paths.append(folder / f"p{index}.png")
        paths[-1].write_bytes(encode(noise_image(*size, seed=index), "PNG"))
    (folder / "broken.png").write_bytes(encode(noise_image(80, 80, 9), "PNG")[:70])
    document = folder / "contract.pdf"
    document.write_bytes(make_pdf([(612, 792), (792, 612), (300, 300)], seed=4, label="contract"))
    rows = [
        {"id": "two", "images": [str(paths[0]), str(paths[1])], "image": None},
        {"id": "three", "images": [str(paths[2]), str(paths[0]), str(paths[1])], "image": None},
        {"id": "one", "images": [str(paths[3])], "image": None},
        {"id": "bad-second", "images": [str(paths[0]), str(folder / "broken.png"), str(paths[1])], "image": None},
        {"id": "missing-third", "images": [str(paths[0]), str(paths[1]), str(folder / "nope.png")], "image": None},
        {"id": "too-many", "images": [str(paths[3])] * 25, "image": None},  # 25 x min_pixels > the total
        {"id": "empty", "images": [], "image": None},
        {"id": "document", "images": None, "image": str(document)},  # per_document: its pages in one prompt
        {"id": "plain", "images": None, "image": str(paths[2])},
    ]
    manifest = write_manifest(folder / "manifest.parquet", rows)
    config = job_config(
        tiny_model, manifest, tmp_path / "out", task={"kind": "document"}, image={"max_total_pixels": TOTAL},
        pdf={"mode": "per_document"}, generation={"max_new_tokens": MAX_NEW_TOKENS},
    )  # fmt: skip
    result = run(config)
    assert result.succeeded, result.summary
    got = {row["id"]: row for row in read_output(tmp_path / "out").to_pylist()}
    assert sorted(got) == sorted(row["id"] for row in rows)
    assert {key for key, row in got.items() if row[schema.STATUS] == schema.OK} == {
        "two", "three", "one", "document", "plain"
    }  # fmt: skip
    assert got["bad-second"][schema.ERROR] == "image 2 of 3: cannot decode PNG: image file is truncated"
    assert got["missing-third"][schema.ERROR] == "image 3 of 3: file not found"
    assert got["too-many"][schema.ERROR] == (
        f"25 images at image.min_pixels ({MIN_PIXELS}) each are over image.max_total_pixels ({TOTAL})"
    )
    assert got["empty"][schema.ERROR] == "'images' is an empty list"
    for key in ("two", "three", "document"):
        assert got[key][schema.WIDTH] is None and got[key][schema.PAGE] is None  # several sizes: see image_tokens
        assert got[key][schema.IMAGE_TOKENS] * 1024 <= TOTAL
    assert got["one"][schema.WIDTH] is None and got["plain"][schema.WIDTH] is not None

    instruction = schema.DEFAULT_PROMPTS["document"]
    opened_images = {str(p): Image.open(p).convert("RGB") for p in paths}
    for key, count in (("two", 2), ("three", 3), ("one", 1)):
        images = [opened_images[location] for location in next(r for r in rows if r["id"] == key)["images"]]
        budget = min(MAX_PIXELS, TOTAL // count)
        assert got[key]["text"] == reference(images, instruction, budget), key
    with opened(document.read_bytes()) as pdf:
        budget = min(MAX_PIXELS, TOTAL // 3)
        pages = [render_page(pdf, number, budget, 100_000_000) for number in (1, 2, 3)]
    assert got["document"]["text"] == reference(pages, instruction, budget)
    assert got["plain"]["text"] == reference([opened_images[str(paths[2])]], instruction, MAX_PIXELS)


def test_images_given_as_bytes(tmp_path: Path, tiny_model: Path) -> None:
    """Encoded images in the list, as a manifest of binaries carries them; a PDF among them is refused by name."""
    import pyarrow as pa

    from qwenbatch.load import Loader
    from qwenbatch.pipeline import limits_for

    config = job_config(tiny_model, tmp_path / "m.parquet", tmp_path / "out", image={"max_total_pixels": TOTAL})
    loader = Loader(model=str(tiny_model), revision=None, limits=limits_for(config), image_column="image")
    pictures = [encode(noise_image(300, 200, 1), "PNG"), encode(noise_image(64, 64, 2), "JPEG")]
    batch = pa.table({"id": ["both", "with-pdf"], "images": [pictures, [pictures[0], make_pdf([(100, 100)])]]})
    rows = loader(batch).select(["id", schema.STATUS, schema.ERROR, schema.SIZES, schema.IMAGE_TOKENS]).to_pylist()
    assert rows[0][schema.STATUS] == schema.OK and len(rows[0][schema.SIZES]) == 4
    sizes = rows[0][schema.SIZES]
    assert rows[0][schema.IMAGE_TOKENS] == (sizes[0] * sizes[1] + sizes[2] * sizes[3]) // 1024
    assert all(w * h <= TOTAL // 2 for w, h in zip(sizes[0::2], sizes[1::2], strict=True))
    assert rows[1][schema.ERROR] == "image 2 of 2: it is a PDF: give a PDF in the image column, one per row"
