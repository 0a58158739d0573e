"""The built-in demo: a tiny model, a few dozen varied images and two small PDFs; caption, vqa and invoice
extraction as JSON on a local Ray."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from qwenbatch.config import JobConfig

# (width, height) cycled through the sample: tiny, wide, tall, large and ordinary.
SIZES = [(16, 16), (1600, 200), (200, 1200), (3000, 2000), (640, 480), (480, 640), (1024, 768), (300, 300)]
QUESTIONS = ["What colour is the largest shape?", "How many shapes are there?", "Is there text in the image?"]
DEMO_MAX_PIXELS = 256 * 32 * 32  # small enough that the CPU demo finishes in seconds
# The document run's answer shape (configs/document.yaml has the full one): the tiny model's noise fails it,
# so its rows show `parse_error` with their raw text; a real model fills it.
INVOICE_SCHEMA = {
    "type": "object",
    "properties": {"vendor": {"type": "string"}, "invoice_number": {"type": "string"}, "total": {"type": "number"}},
    "required": ["vendor", "total"],
}
# (page size in points, its lines): an invoice of three pages and a one-page receipt.
DOCUMENTS = {
    "invoice-0001": [
        ((612, 792), ["ACME Supplies Ltd.", "Invoice INV-0001", "Date: 2026-11-30", "Bill to: Example GmbH"]),
        ((612, 792), ["Item            Qty   Price", "Paper A4        10    4.50", "Toner black      2   61.00"]),
        ((792, 612), ["Subtotal  167.00", "VAT 20%    33.40", "Total     200.40 EUR"]),
    ],
    "receipt-0002": [((226, 600), ["Corner Cafe", "Receipt 0002", "Coffee 3.20", "Cake 4.10", "Total 7.30"])],
}


def draw_image(width: int, height: int, rng: random.Random) -> Image.Image:
    """A gradient background with a few shapes: cheap, varied, deterministic."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 5)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randint(1, max(1, width // 2)), y0 + rng.randint(1, max(1, height // 2))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return image


def make_images(folder: str | Path, count: int = 48, seed: int = 0, broken: int = 1) -> Path:
    """Write `count` images (JPEG and PNG, mixed sizes) and a manifest; `broken` of them truncated."""
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        fmt = "JPEG" if index % 3 else "PNG"
        path = images / f"img_{index:04d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        buffer = io.BytesIO()
        draw_image(width, height, rng).save(buffer, format=fmt)
        data = buffer.getvalue()
        if index >= count - broken:
            data = data[: len(data) // 3]  # a truncated file: one row with a load_error, not a failed job
        path.write_bytes(data)
        rows.append({"id": f"img_{index:04d}", "image": str(path), "question": QUESTIONS[index % len(QUESTIONS)]})
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest


def draw_page(size: tuple[int, int], lines: list[str]) -> Image.Image:
    """A white page (one pixel a point) with lines of text."""
    page = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(page)
    for index, line in enumerate(lines):
        draw.text((24, 24 + 18 * index), line, fill=(0, 0, 0))
    return page


def make_documents(folder: str | Path) -> Path:
    """Write the demo's PDFs (one of several pages) and their manifest, `documents.parquet`."""
    folder = Path(folder)
    (folder / "documents").mkdir(parents=True, exist_ok=True)
    rows = []
    for name, pages in DOCUMENTS.items():
        drawn = [draw_page(size, lines) for size, lines in pages]
        path = folder / "documents" / f"{name}.pdf"
        drawn[0].save(path, format="PDF", save_all=True, append_images=drawn[1:], resolution=72.0)
        rows.append({"id": name, "image": str(path)})
    manifest = folder / "documents.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest


def demo_config(folder: str | Path, task: str) -> JobConfig:
    """caption and vqa over the images; document: the PDFs, a row per page, fields as JSON."""
    folder = Path(folder)
    document = task == "document"
    return JobConfig.model_validate(
        {
            "model": {"name": str(folder / "model"), "dtype": "float32"},
            "task": {"kind": task} | ({"output": "json", "json_schema": INVOICE_SCHEMA} if document else {}),
            "generation": {"max_new_tokens": 16},
            "image": {"max_pixels": DEMO_MAX_PIXELS},
            "input": {"path": str(folder / ("documents.parquet" if document else "manifest.parquet"))},
            # The tiny model's noise is never JSON: every page is a parse_error, which is the check at work.
            "output": {"path": str(folder / "output" / task)} | ({"max_error_rate": 1.0} if document else {}),
            "run": {"batch_size": 8, "device": "cpu"},
        }
    )


def prepare(folder: str | Path, count: int = 48) -> Path:
    from qwenbatch.tiny import build_tiny_model

    folder = Path(folder)
    build_tiny_model(folder / "model")
    if not (folder / "manifest.parquet").exists():
        make_images(folder, count=count)
    if not (folder / "documents.parquet").exists():
        make_documents(folder)
    return folder
