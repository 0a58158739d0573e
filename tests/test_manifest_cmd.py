"""`qwenbatch manifest`: a folder of images, nested at any depth, becomes a valid job manifest.

The same command on an s3:// prefix, feeding a real job, is in test_storage_s3.py.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from qwenbatch import schema
from qwenbatch.cli import main
from qwenbatch.config import InputConfig
from qwenbatch.read import open_manifest
from tests.helpers import encode, noise_image

IMAGES = ["top.png", "a/0.jpg", "a/b/1.PNG", "c/d/e/2.webp", "_raw/3.jpeg"]
NOT_IMAGES = ["notes.txt", "a/b/data.json", ".cache/4.png", "a/.hidden.png"]


def test_manifest_of_a_nested_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "archive"
    for index, name in enumerate(IMAGES + NOT_IMAGES):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
        path.write_bytes(encode(noise_image(16 + index, 16, index), fmt))
    out = tmp_path / "manifests" / "archive.parquet"

    assert main(["manifest", str(folder), str(out)]) == 0

    table = pq.read_table(out)
    assert table.column_names == [schema.ID, schema.IMAGE, schema.SIZE]
    assert table.column(schema.ID).to_pylist() == sorted(IMAGES)
    assert table.column(schema.IMAGE).to_pylist() == [str(folder / name) for name in sorted(IMAGES)]
    assert table.column(schema.SIZE).to_pylist() == [(folder / name).stat().st_size for name in sorted(IMAGES)]
    assert f"{len(IMAGES)} images" in capsys.readouterr().out
    assert open_manifest(InputConfig(path=str(out))).rows == len(IMAGES)

    again = tmp_path / "again.parquet"
    assert main(["manifest", str(folder) + "/", str(again)]) == 0
    assert pq.read_table(again).equals(table)  # ids are relative paths: the same folder, the same manifest


def test_a_folder_without_images_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no pictures here")

    assert main(["manifest", str(tmp_path / "empty"), str(tmp_path / "m.parquet")]) == 2

    error = capsys.readouterr().err.strip()
    assert error.startswith(f"qwenbatch: error: {tmp_path / 'empty'}: no image files (.jpg, .jpeg")
    assert "\n" not in error
    assert not (tmp_path / "m.parquet").exists()
