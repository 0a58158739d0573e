"""Bad input: every broken, hostile or odd image is one row with a clear status, and the job goes on.

The decode and conversion rules are checked directly (fast); one real pipeline run on the shared
local Ray then proves the row contract for all the cases mixed with good images.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from qwenbatch import schema
from qwenbatch.cli import main
from qwenbatch.decode import EXIF_ORIENTATION, decode, to_rgb
from qwenbatch.inputs import ManifestError, check_ids
from qwenbatch.locations import LoadError, LoadLimits
from qwenbatch.pipeline import run
from tests.helpers import encode, job_config, noise_image, read_output, write_manifest

MAX_BYTES = 50_000  # small, so an over-limit file stays small too
LIMITS = LoadLimits(min_pixels=4096, max_pixels=65536, allowed_prefixes=("/",), max_bytes=MAX_BYTES)


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A 69-byte PNG whose header claims `width`x`height` (IHDR rewritten, its CRC fixed)."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), "PNG"))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def bomb_jpeg(width: int = 60_000, height: int = 60_000) -> bytes:
    """A small JPEG whose start-of-frame header claims `width`x`height`."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), "JPEG"))
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def exif_rotated(width: int, height: int) -> bytes:
    """A JPEG stored `width`x`height` whose EXIF says: rotate 90 degrees clockwise to view."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return encode(noise_image(width, height, 7), "JPEG", exif=exif.tobytes())


def sixteen_bit(width: int, height: int) -> Image.Image:
    values = np.linspace(0, 65535, width * height).astype(np.uint16).reshape(height, width)
    return Image.fromarray(values)


def palette_with_transparency(width: int, height: int) -> bytes:
    image = noise_image(width, height, 3).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


def truncated(data: bytes, share: float = 0.6) -> bytes:
    return data[: int(len(data) * share)]


# --- decode and to_rgb, directly ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "empty file"),
        (b"hello, I am text pretending to be a JPEG\n", "not a recognised image file"),
        (truncated(encode(noise_image(200, 150, 1), "JPEG")), "cannot decode JPEG: image file is truncated"),
        (truncated(encode(noise_image(200, 150, 1), "PNG")), "cannot decode PNG"),
        (encode(noise_image(200, 150, 1), "JPEG")[:200], "cannot read the image header"),
        (bomb_png(), "claims 50000x50000 = 2500000000 pixels, over the limit of 100000000 (decompression bomb"),
        (bomb_jpeg(), "claims 60000x60000 = 3600000000 pixels, over the limit of 100000000 (decompression bomb"),
        (encode(Image.new("RGB", (8, 8)), "TIFF"), "format TIFF is not allowed (allowed: JPEG, PNG)"),
        (encode(Image.new("RGB", (16, 16)), "ICO"), "format ICO is not allowed"),
        (os.urandom(MAX_BYTES + 1), f"image is {MAX_BYTES + 1} bytes, over the limit of {MAX_BYTES}"),
    ],
    ids=[
        "empty",
        "text",
        "truncated-jpeg",
        "truncated-png",
        "cut-header",
        "bomb-png",
        "bomb-jpeg",
        "tiff",
        "ico",
        "big",
    ],
)
def test_decode_refuses(data: bytes, expected: str) -> None:
    limits = dataclasses.replace(LIMITS, formats=("JPEG", "PNG"))
    with pytest.raises(LoadError) as caught:
        decode(data, limits)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_bombs_are_tiny_files() -> None:
    """The header check stops them: a full decode would need gigabytes for these few bytes."""
    assert len(bomb_png()) < 100 and len(bomb_jpeg()) < 1000


@pytest.mark.parametrize(
    ("image", "pixel"),
    [
        (Image.new("RGB", (6, 4), (10, 20, 30)).convert("CMYK"), None),
        (Image.new("L", (6, 4), 100), (100, 100, 100)),
        (Image.new("LA", (6, 4), (100, 0)), (255, 255, 255)),  # fully transparent: white background
        (Image.new("RGBA", (6, 4), (200, 10, 10, 255)), (200, 10, 10)),
        (Image.fromarray(np.full((4, 6), 65535, np.uint16)), (255, 255, 255)),  # 16-bit white stays white
        (Image.fromarray(np.full((4, 6), 32768, np.uint16)), (128, 128, 128)),
        (Image.open(io.BytesIO(palette_with_transparency(6, 4))), None),
    ],
    ids=["cmyk", "grey", "grey-alpha", "rgba", "16bit-white", "16bit-mid", "palette-transparency"],
)
def test_to_rgb_modes(image: Image.Image, pixel: tuple[int, int, int] | None) -> None:
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (6, 4)
    if pixel is not None:
        assert rgb.getpixel((0, 0)) == pixel


def test_exif_rotation_moves_pixels() -> None:
    stored = Image.new("RGB", (4, 2), (0, 0, 0))
    stored.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    upright = to_rgb(decode(encode(stored, "PNG", exif=exif.tobytes()), LIMITS))
    assert upright.size == (2, 4)
    assert upright.getpixel((1, 0)) == (255, 0, 0)  # the top-left corner, turned clockwise, is top-right


# --- the real pipeline over every case -----------------------------------------------------------

OK_CASES = ("good-jpeg", "good-png", "cmyk", "grey", "sixteen-bit", "palette-alpha", "exif-rotated", "one-pixel")
# id -> (status, text the error must contain)
BAD_CASES = {
    "missing": (schema.LOAD_ERROR, "file not found"),
    "empty": (schema.LOAD_ERROR, "empty file"),
    "text-as-jpeg": (schema.LOAD_ERROR, "not a recognised image file"),
    "truncated-jpeg": (schema.LOAD_ERROR, "cannot decode JPEG: image file is truncated"),
    "truncated-png": (schema.LOAD_ERROR, "cannot decode PNG"),
    "too-many-bytes": (schema.LOAD_ERROR, f"over the limit of {MAX_BYTES}"),
    "bomb-png": (schema.LOAD_ERROR, "(decompression bomb guard)"),
    "bomb-jpeg": (schema.LOAD_ERROR, "(decompression bomb guard)"),
    "tiff": (schema.LOAD_ERROR, "format TIFF is not allowed"),
    "strip": (
        schema.LOAD_ERROR,
        "the model cannot take a 20000x8 image: absolute aspect ratio must be smaller than 200",
    ),
    "no-location": (schema.LOAD_ERROR, "row has neither 'image' nor 'image_bytes'"),
}


NO_QUESTION = {"question-null": None, "question-blank": "   "}


def write_cases(folder: Path) -> dict[str, str | None]:
    """Every case as a real file; id -> location (None: the row has no location at all)."""
    folder.mkdir(parents=True)
    files = {
        "good-jpeg.jpg": encode(noise_image(64, 48, 1), "JPEG"),
        "good-png.png": encode(noise_image(40, 40, 2), "PNG"),
        "cmyk.jpg": encode(noise_image(48, 48, 3).convert("CMYK"), "JPEG"),
        "grey.png": encode(noise_image(48, 32, 4, mode="L"), "PNG"),
        "sixteen-bit.png": encode(sixteen_bit(40, 30), "PNG"),
        "palette-alpha.png": palette_with_transparency(40, 40),
        "exif-rotated.jpg": exif_rotated(96, 48),
        "one-pixel.png": encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"),
        "empty.jpg": b"",
        "text-as-jpeg.jpg": b"this is a text file, not a JPEG\n",
        "truncated-jpeg.jpg": truncated(encode(noise_image(200, 150, 5), "JPEG")),
        "truncated-png.png": truncated(encode(noise_image(200, 150, 6), "PNG")),
        "too-many-bytes.png": encode(Image.frombytes("RGB", (160, 160), os.urandom(160 * 160 * 3)), "PNG"),
        "bomb-png.png": bomb_png(),
        "bomb-jpeg.jpg": bomb_jpeg(),
        "tiff.tif": encode(noise_image(32, 32, 8), "TIFF"),
        "strip.png": encode(Image.new("RGB", (20000, 8), (50, 60, 70)), "PNG"),
    }
    locations: dict[str, str | None] = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        locations[name.rsplit(".", 1)[0]] = str(folder / name)
    sizes = {name: len(data) for name, data in files.items()}
    assert sizes.pop("too-many-bytes.png") > MAX_BYTES > max(sizes.values())
    locations["missing"] = str(folder / "missing.jpg")
    locations["no-location"] = None
    return locations


def test_every_case_is_one_row(tmp_path: Path, tiny_model: Path, ray_local) -> None:
    """All cases in one vqa run; two good images lack their question (prompt_error)."""
    locations = write_cases(tmp_path / "images")
    assert set(locations) == set(OK_CASES) | set(BAD_CASES)
    rows = [
        {"id": key, "image": location, "question": "What is this?", "note": f"row {i}"}
        for i, (key, location) in enumerate(locations.items())
    ]
    rows += [{"id": key, "image": locations["good-png"], "question": q, "note": key} for key, q in NO_QUESTION.items()]
    manifest = write_manifest(tmp_path / "manifest.parquet", rows)
    image = {"max_bytes": MAX_BYTES, "formats": ["JPEG", "PNG"]}
    # Most cases are bad on purpose, past the default error-rate limit: the limit is off, so the verdict
    # asserted below is about bad rows alone (the limit's own test is test_retry).
    config = job_config(tiny_model, manifest, tmp_path / "out", image=image, task={"kind": "vqa"})
    config.output.max_error_rate = 1.0

    result = run(config)

    table = read_output(tmp_path / "out")
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in rows)  # one row per input, none twice
    out = {row["id"]: row for row in table.to_pylist()}
    for key in OK_CASES:
        row = out[key]
        assert (row["status"], row["error"]) == (schema.OK, None), key
        assert row["text"] is not None and row["output_tokens"] >= 1, key
        assert row["width"] * row["height"] >= config.image.min_pixels, key
    for key, (status, message) in BAD_CASES.items():
        row = out[key]
        assert row["status"] == status, (key, row["error"])
        assert message in row["error"] and "\n" not in row["error"], (key, row["error"])
        assert row["text"] is None and row["width"] is None, key
    for key in NO_QUESTION:
        assert (out[key]["status"], out[key]["error"]) == (
            schema.PROMPT_ERROR,
            "vqa row has no question in column 'question'",
        )
        assert out[key]["width"] is not None and out[key]["text"] is None  # the image loaded; no prompt
    assert out["exif-rotated"]["height"] > out["exif-rotated"]["width"]  # stored 96x48, seen upright
    assert all(out[row["id"]]["note"] == row["note"] for row in rows)  # other columns carried through
    assert not {schema.PIXELS, schema.CHAT, schema.IMAGE_BYTES} & set(table.column_names)

    assert result.succeeded  # bad rows are recorded, not fatal
    assert result.summary["output"]["status"] == {
        schema.OK: len(OK_CASES),
        schema.LOAD_ERROR: len(BAD_CASES),
        schema.PROMPT_ERROR: len(NO_QUESTION),
    }


def test_a_decode_over_the_load_actors_memory_is_a_load_error(tmp_path: Path, tiny_model: Path, ray_local) -> None:
    """A 12000x10000 PNG (a flat colour: 1 MB on disk, 360 MB decoded) under a 256 MiB cap on the load
    actors: the decode fails inside the actor, that row alone is a load_error, its neighbours load."""
    folder = tmp_path / "images"
    folder.mkdir()
    huge = folder / "huge.png"
    Image.new("RGB", (12_000, 10_000), (200, 30, 90)).save(huge, "PNG", compress_level=1)
    good = []
    for index in range(6):
        path = folder / f"good{index}.png"
        noise_image(64, 48, index).save(path, "PNG")
        good.append(path)
    rows = [{"id": path.stem, "image": str(path)} for path in [*good[:3], huge, *good[3:]]]
    manifest = write_manifest(tmp_path / "manifest.parquet", rows)
    image = {"max_source_pixels": 200_000_000}
    config = job_config(tiny_model, manifest, tmp_path / "out", image=image, run={"load_memory_mb": 256})

    result = run(config)

    out = {row["id"]: row for row in read_output(tmp_path / "out").to_pylist()}
    assert sorted(out) == sorted(row["id"] for row in rows)
    assert out["huge"]["status"] == schema.LOAD_ERROR
    assert out["huge"]["error"] == (
        "decoding this 12000x10000 image needs more memory than a load actor may use (256 MiB, run.load_memory_mb)"
    )
    assert all(out[path.stem]["status"] == schema.OK for path in good)
    assert result.succeeded


# --- manifest checks: job-level errors before any work ------------------------------------------


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        (["a", None, "c"], "1 rows have a null or empty 'id'; every row needs a unique id"),
        (["a", "", "  "], "2 rows have a null or empty 'id'; every row needs a unique id"),
        (["a", "b", "a", "c", "c"], "2 ids appear more than once in 'id', e.g. 'a', 'c'"),
    ],
    ids=["null", "empty", "duplicate"],
)
def test_bad_ids_stop_the_job(tmp_path: Path, tiny_model: Path, ids: list, expected: str) -> None:
    with pytest.raises(ManifestError, match="^" + expected.replace("(", r"\(").replace(")", r"\)") + "$"):
        check_ids(pa.chunked_array([pa.array(ids, pa.string())]), "id")
    rows = [{"id": i, "image": str(tmp_path / f"{n}.png")} for n, i in enumerate(ids)]
    config = job_config(tiny_model, write_manifest(tmp_path / "m.parquet", rows), tmp_path / "out")
    with pytest.raises(ManifestError, match="every row needs a unique id|appear more than once"):
        run(config)
    assert not (tmp_path / "out").exists()  # nothing was started, nothing written


def test_manifest_without_image_column_stops_before_any_work(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "picture": ["/x/a.jpg", "/x/b.jpg"]}), manifest)
    config = job_config(tiny_model, manifest, tmp_path / "out")
    with pytest.raises(ManifestError, match="manifest has neither an image column 'image' nor 'image_bytes'"):
        run(config)
    assert not (tmp_path / "out").exists()

    job = tmp_path / "job.yaml"
    job.write_text(f"model: {tiny_model}\ninput: {{path: {manifest}}}\noutput: {{path: {tmp_path / 'out'}}}\n")
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qwenbatch: error: manifest has neither an image column 'image'") and "\n" not in err
    assert not (tmp_path / "out").exists()
