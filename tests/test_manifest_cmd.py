"""`qwenbatch manifest`: a folder of images, nested at any depth, becomes a valid job manifest.

The same command on an s3:// prefix, feeding a real job, is in test_storage_s3.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from qwenbatch import schema
from qwenbatch.cli import main
from qwenbatch.config import ConfigError, InputConfig
from qwenbatch.locations import check_locations
from qwenbatch.read import open_manifest
from tests.helpers import encode, noise_image, read_output, write_images, write_job, write_manifest

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


def test_manifest_root_run(tmp_path: Path, tiny_model: Path, ray_local, capsys: pytest.CaptureFixture[str]) -> None:
    """README's layout: images in one folder, the manifest written to another. The manifest records the folder
    it walked, so the run reads there with no image.allowed_prefixes; a manifest without that record, pointing
    at the same images, stops before Ray starts, in one line that names the folder to allow."""
    images = write_images(tmp_path / "photos", 3, sizes=[(64, 64)])
    made = tmp_path / "manifests" / "photos.parquet"
    assert main(["manifest", str(tmp_path / "photos"), str(made)]) == 0
    job = write_job(tmp_path / "job.yaml", tiny_model, made, tmp_path / "out")
    assert main(["run", str(job)]) == 0
    rows = read_output(tmp_path / "out").to_pylist()
    assert sorted(r[schema.ID] for r in rows) == sorted(p.name for p in images)
    assert all(r[schema.STATUS] == schema.OK for r in rows), rows
    capsys.readouterr()

    by_hand = write_manifest(tmp_path / "other" / "m.parquet", [{"id": p.name, "image": str(p)} for p in images])
    job = write_job(tmp_path / "job2.yaml", tiny_model, by_hand, tmp_path / "out2")
    assert main(["run", str(job)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("qwenbatch: error: image.allowed_prefixes:"), error
    assert f"image.allowed_prefixes=[{os.path.realpath(tmp_path / 'photos')}]" in error, error
    assert not (tmp_path / "out2").exists()  # nothing started, nothing written


def test_only_a_sample_wholly_outside_is_the_configs_problem(tmp_path: Path) -> None:
    inside, outside = tmp_path / "in", tmp_path / "out"
    allowed = (os.path.realpath(inside),)
    check_locations([str(outside / "a.jpg"), str(inside / "b.jpg")], allowed)  # the one outside: a row error
    check_locations([], allowed)
    with pytest.raises(ConfigError, match=r"image.allowed_prefixes=\[.*/out\]"):
        check_locations([str(outside / "a.jpg"), str(outside / "deeper" / "c.jpg")], allowed)
    with pytest.raises(ConfigError, match=r"s3://bucket/images"):
        check_locations(["s3://bucket/images/a.jpg"], allowed)
