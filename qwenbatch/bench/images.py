"""Benchmark images: photo-like JPEGs of chosen sizes and a manifest, made once and reused."""

from __future__ import annotations

import random
from pathlib import Path

QUESTION = "What is in this picture?"


def photo_like(width: int, height: int, rng: random.Random):
    """Smooth colour fields with detail: compresses like a photo, cheap to make at 12 MP."""
    from PIL import Image, ImageDraw, ImageFilter

    small = Image.effect_noise((max(1, width // 64), max(1, height // 64)), 80).convert("RGB")
    image = small.resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(width), rng.randrange(height)
        radius = rng.randint(4, max(5, min(width, height) // 6))
        colour = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    return image.filter(ImageFilter.SMOOTH)


def make_bench_images(folder: Path, count: int, sizes: list[tuple[int, int]], seed: int = 0) -> Path:
    """JPEGs and a manifest; reused when they already exist, since a 12 MP JPEG takes a while to make."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = folder / f"manifest-{count}.parquet"
    if manifest.exists():
        return manifest
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        path = folder / "images" / f"b{index:05d}_{width}x{height}.jpg"
        if not path.exists():
            photo_like(width, height, rng).save(path, format="JPEG", quality=90)
        rows.append({"id": f"b{index:05d}", "image": str(path), "question": QUESTION})
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest
