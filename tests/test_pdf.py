"""PDFs: real files (several pages and sizes, encrypted, corrupt, truncated, empty) through the load stage and
the whole pipeline; a page's text equals the plain transformers call on the same rendered page."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from qwenbatch import schema
from qwenbatch.config import PdfConfig
from qwenbatch.load import Loader
from qwenbatch.locations import LoadError
from qwenbatch.pdf import chosen_pages, opened, render_page
from qwenbatch.pipeline import limits_for, run
from qwenbatch.status import format_status, read_status
from tests.helpers import PlainTransformers, encode, job_config, noise_image, read_output, write_manifest
from tests.pdfs import corrupt_pdf, encrypted_pdf, make_pdf, truncated_pdf, zero_page_pdf

MAX_NEW_TOKENS = 8
BUDGET = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64}  # tests.helpers.job_config's pixel budget
MAX_PIXELS = BUDGET["longest_edge"]
# Documents of several pages and page sizes (points): letter, landscape, a strip, a tiny card.
DOCS = {
    "invoice": [(612, 792), (792, 612), (612, 792)],
    "strip": [(1400, 180)],
    "cards": [(90, 54), (300, 300), (420, 595), (595, 842), (200, 900)],
}
POSTER_PT = (14400, 14400)  # PDF's largest page: 207M pixels at 72 dpi, over image.max_source_pixels


def loaded_rows(loader: Loader, batch: pa.Table) -> list[dict]:
    """Every row the load stage hands on, whether it gave one table or a table per part."""
    out = loader(batch)
    tables = [out] if isinstance(out, pa.Table) else list(out)
    columns = ["id", schema.PAGE, schema.STATUS, schema.ERROR, schema.WIDTH, schema.HEIGHT, schema.DOCUMENT]
    return [row for table in tables for row in table.select(columns).to_pylist()]


def test_page_choice() -> None:
    assert chosen_pages(4, PdfConfig()) == ([1, 2, 3, 4], [])
    assert chosen_pages(4, PdfConfig(pages="first")) == ([1], [])
    assert chosen_pages(4, PdfConfig(pages=[3, 1, 9])) == ([1, 3], [])
    assert chosen_pages(5, PdfConfig(max_pages=2)) == ([1, 2], [3, 4, 5])
    with pytest.raises(LoadError, match=r"^PDF has 2 pages; none of the pages asked for \(5, 7\)$"):
        chosen_pages(2, PdfConfig(pages=[5, 7]))


def test_pages_render_at_the_pixel_budget_not_larger() -> None:
    sizes = DOCS["cards"] + DOCS["invoice"] + DOCS["strip"]
    with opened(make_pdf(sizes)) as document:
        for number, (width_pt, height_pt) in enumerate(sizes, 1):
            image = render_page(document, number, MAX_PIXELS, 100_000_000)
            width, height = image.size
            assert image.mode == "RGB"
            assert abs(width / height - width_pt / height_pt) < 0.02 * (width_pt / height_pt) + 2 / height
            # As many pixels as the budget allows (pdfium rounds each side up), whatever the page's size.
            assert MAX_PIXELS <= width * height <= MAX_PIXELS + width + height + 1, (number, image.size)


def test_bad_documents_and_pages_are_rows_with_clear_errors(tmp_path: Path, tiny_model: Path) -> None:
    good = make_pdf(DOCS["cards"], seed=1)
    documents = {
        "good": good,
        "encrypted": encrypted_pdf(),
        "corrupt": corrupt_pdf(good),
        "truncated": truncated_pdf(good),
        "empty": zero_page_pdf(),
        "poster": make_pdf([(300, 400), POSTER_PT], seed=2),
    }
    config = job_config(tiny_model, tmp_path / "m.parquet", tmp_path / "out", pdf={"max_pages": 3})
    loader = Loader(model=str(tiny_model), revision=None, limits=limits_for(config), image_column="image")
    batch = pa.table({"id": list(documents), schema.IMAGE_BYTES: list(documents.values())})
    rows = {row["id"]: row for row in loaded_rows(loader, batch)}
    assert list(rows) == [
        "good#p1",
        "good#p2",
        "good#p3",
        "good#p4",  # pages 4 and 5 over pdf.max_pages: one row, under the first page not processed
        "encrypted",
        "corrupt",
        "truncated",
        "empty",
        "poster#p1",
        "poster#p2",
    ]
    for page in (1, 2, 3):
        row = rows[f"good#p{page}"]
        assert (row[schema.STATUS], row[schema.PAGE], row[schema.DOCUMENT]) == (schema.OK, page, "good")
        assert row[schema.WIDTH] * row[schema.HEIGHT] <= MAX_PIXELS
    assert rows["good#p4"][schema.PAGE] == 4 and rows["good#p4"][schema.STATUS] == schema.LOAD_ERROR
    assert (
        rows["good#p4"][schema.ERROR] == "2 more pages (4, 5) of this 5-page PDF not processed: over pdf.max_pages (3)"
    )
    expected = {
        "encrypted": "PDF is encrypted (it needs a password); decrypt it first",
        "corrupt": "cannot open PDF: the file is corrupt (not a readable PDF structure)",
        "truncated": "cannot open PDF: the file is truncated (no end-of-file marker)",
        "empty": "PDF has no pages",
    }
    for key, error in expected.items():
        assert (rows[key][schema.STATUS], rows[key][schema.ERROR], rows[key][schema.PAGE]) == (
            schema.LOAD_ERROR,
            error,
            None,
        ), key
    assert rows["poster#p1"][schema.STATUS] == schema.OK
    assert rows["poster#p2"][schema.STATUS] == schema.LOAD_ERROR
    assert rows["poster#p2"][schema.ERROR] == (
        "page 2 is 14400x14400 pt = 207360000 pixels at 72 dpi, over the limit of 100000000 (image.max_source_pixels)"
    )


def test_page_choice_and_formats_in_the_load_stage(tmp_path: Path, tiny_model: Path) -> None:
    document = make_pdf(DOCS["cards"], seed=3)
    batch = pa.table({"id": ["d"], schema.IMAGE_BYTES: [document]})
    for pages, ids in (("first", ["d#p1"]), ([2, 5], ["d#p2", "d#p5"])):
        config = job_config(tiny_model, tmp_path / "m.parquet", tmp_path / "out", pdf={"pages": pages})
        loader = Loader(model=str(tiny_model), revision=None, limits=limits_for(config), image_column="image")
        rows = loaded_rows(loader, batch)
        assert [row["id"] for row in rows] == ids and {row[schema.STATUS] for row in rows} == {schema.OK}
    images_only = job_config(tiny_model, tmp_path / "m.parquet", tmp_path / "out", image={"formats": ["PNG"]})
    loader = Loader(model=str(tiny_model), revision=None, limits=limits_for(images_only), image_column="image")
    [row] = loaded_rows(loader, batch)
    assert (row["id"], row[schema.ERROR]) == ("d", "format PDF is not allowed (allowed: PNG)")


@pytest.fixture(scope="module")
def reference(tiny_model: Path):
    """The plain transformers call on given PIL images (a rendered page), at the pipeline's pixel budget."""
    plain = PlainTransformers(tiny_model)
    return lambda images, text: plain.answer(images, text, BUDGET, MAX_NEW_TOKENS)


def test_pdfs_through_the_pipeline(tmp_path: Path, tiny_model: Path, ray_local, reference) -> None:
    """One row per page, ids `<id>#p<page>`, every bad case its own row; a rerun finds every document done;
    each page's text equals the plain transformers call on the same rendered page."""
    folder = tmp_path / "docs"
    folder.mkdir()
    files = {}
    for seed, (name, sizes) in enumerate(DOCS.items()):
        files[name] = folder / f"{name}.pdf"
        files[name].write_bytes(make_pdf(sizes, seed=seed, label=name))
    (folder / "photo.png").write_bytes(encode(noise_image(200, 150, 7), "PNG"))
    outside = tmp_path / "elsewhere.pdf"
    outside.write_bytes(make_pdf([(300, 300)]))
    rows = [{"id": name, "image": str(path), "image_bytes": None, "note": name} for name, path in files.items()]
    rows += [
        {"id": "photo", "image": str(folder / "photo.png"), "image_bytes": None, "note": "an image among documents"},
        {"id": "outside", "image": str(outside), "image_bytes": None, "note": "outside the allowed prefixes"},
        {"id": "encrypted", "image": None, "image_bytes": encrypted_pdf(), "note": "bytes"},
        {"id": "bytes-doc", "image": None, "image_bytes": make_pdf([(500, 300), (300, 500)], seed=9), "note": "bytes"},
    ]
    manifest = write_manifest(folder / "manifest.parquet", rows)
    config = job_config(
        tiny_model, manifest, tmp_path / "out", task={"kind": "document"}, pdf={"max_pages": 4},
        generation={"max_new_tokens": MAX_NEW_TOKENS},
    )  # fmt: skip
    result = run(config)
    assert result.succeeded, result.summary
    table = read_output(tmp_path / "out")
    for field in schema.OUTPUT_FIELDS:
        assert table.schema.field(field.name).type == field.type
    assert not {c for c in table.column_names if c.startswith("_")}  # internal columns stay internal
    got = {row["id"]: row for row in table.to_pylist()}
    assert sorted(got) == sorted(
        ["invoice#p1", "invoice#p2", "invoice#p3", "strip#p1", "cards#p1", "cards#p2", "cards#p3", "cards#p4"]
        + ["cards#p5", "photo", "outside", "encrypted", "bytes-doc#p1", "bytes-doc#p2"]
    )
    assert got["cards#p5"][schema.STATUS] == schema.LOAD_ERROR and got["cards#p5"][schema.PAGE] == 5
    assert "over pdf.max_pages (4)" in got["cards#p5"][schema.ERROR]
    assert got["outside"][schema.STATUS] == schema.LOAD_ERROR
    assert got["outside"][schema.ERROR].startswith("location is outside image.allowed_prefixes")
    assert got["encrypted"][schema.ERROR] == "PDF is encrypted (it needs a password); decrypt it first"
    assert got["photo"][schema.STATUS] == schema.OK and got["photo"][schema.PAGE] is None
    assert got["invoice#p2"]["note"] == "invoice"  # the document's columns carry to each of its pages

    summary = result.summary
    assert summary["manifest_rows"] == len(rows) and summary["this_run"]["inputs"] == len(rows)
    assert summary["this_run"]["rows"] == len(got) and summary["output"]["inputs"] == len(rows)

    # Fidelity: each page as qwenbatch renders it, through the plain processor + generate, one at a time.
    instruction = schema.DEFAULT_PROMPTS["document"]
    pages = [(key, row) for key, row in got.items() if row[schema.PAGE] is not None and row["status"] == schema.OK]
    assert len(pages) == 10
    for key, row in pages:
        source = row["image"] and Path(row["image"]).read_bytes() or rows[-1]["image_bytes"]
        with opened(source) as document:
            image = render_page(document, row[schema.PAGE], MAX_PIXELS, 100_000_000)
        assert row["text"] == reference([image], instruction), key

    # The same command again: every document is done (all of its pages were written together).
    again = run(config, force=True)
    assert again.summary["skipped_done"] == len(rows) and again.summary["this_run"]["rows"] == 0
    assert again.succeeded and read_output(tmp_path / "out").num_rows == len(got)
    saved = json.loads((tmp_path / "out" / schema.SUMMARY_FILE).read_text())
    assert saved["state"] == "succeeded"
    # `qwenbatch status` counts manifest rows against the manifest, and says how many rows the pages made.
    shown = format_status(read_status(str(tmp_path / "out")))
    assert (
        f"rows       {len(rows)} of {len(rows)} in the manifest (this run 0; {len(rows)} already done), "
        f"written as {len(got)} output rows (a row per PDF page)"
    ) in shown
