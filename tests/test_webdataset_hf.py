"""WebDataset tars and Hugging Face datasets as job input: one output row per image, corrupt ones too."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from qwenbatch import schema
from qwenbatch.config import InputConfig
from qwenbatch.inputs import ManifestError
from qwenbatch.pipeline import run
from qwenbatch.read import open_manifest, read_manifest
from tests.helpers import encode, job_config, noise_image, read_output
from tests.pdfs import make_pdf

GARBAGE = b"this is no image at all, whatever its name says"


def image(index: int, fmt: str = "PNG") -> bytes:
    return encode(noise_image(40 + 8 * index, 32, index), fmt)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_tars_give_one_row_per_sample(tiny_model: Path, ray_local, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_tar(
        shards / "train-000.tar",
        [
            ("s000.jpg", image(0, "JPEG")),
            ("s000.txt", "a red square, ünïcode".encode()),
            ("s000.json", b'{"camera": "front"}'),
            ("s001.png", image(1)),
            ("s001.txt", b"a blue circle"),
            ("nested/s002.png", image(2)),
        ],
    )
    write_tar(
        shards / "train-001.tar",
        [
            ("s003.jpg", GARBAGE),  # corrupt member: its row's load_error, not a failed read
            ("s003.txt", b"broken"),
            ("s004.png", image(4)),
            ("s004.question.txt", b"What colour is it?"),
            ("s005.txt", b"a caption whose image went missing"),
            ("s006.pdf", make_pdf([(300, 200), (200, 300)], seed=6)),  # a document: a row per page
            ("s006.txt", b"a scanned form"),
        ],
    )
    (shards / "README").write_text("not a shard")

    result = run(job_config(tiny_model, shards, tmp_path / "out", input={"format": "webdataset"}))

    table = read_output(tmp_path / "out")
    assert schema.IMAGE_BYTES not in table.column_names
    rows = {row["id"]: row for row in table.to_pylist()}
    assert sorted(rows) == ["nested/s002", "s000", "s001", "s003", "s004", "s005", "s006#p1", "s006#p2"]
    for key in ("s000", "s001", "nested/s002", "s004", "s006#p1", "s006#p2"):
        assert rows[key]["status"] == schema.OK and rows[key]["text"] is not None, rows[key]
    assert (rows["s003"]["status"], rows["s003"]["error"]) == (schema.LOAD_ERROR, "not a recognised image file")
    assert rows["s005"]["status"] == schema.LOAD_ERROR
    assert rows["s005"]["error"] == "row has neither 'image' nor 'image_bytes'"
    assert rows["s000"]["txt"] == "a red square, ünïcode"
    assert rows["s000"]["json"] == '{"camera": "front"}'
    assert rows["s004"]["question.txt"] == "What colour is it?"
    assert rows["s001"]["json"] is None
    assert rows["s003"][schema.SHARD].endswith("train-001.tar")
    assert [(rows[f"s006#p{p}"][schema.PAGE], rows[f"s006#p{p}"]["txt"]) for p in (1, 2)] == [
        (1, "a scanned form"),
        (2, "a scanned form"),
    ]
    assert result.summary["output"]["status"] == {schema.OK: 6, schema.LOAD_ERROR: 2}


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ([("a.png", b"x"), ("b.png", b"x"), ("a.txt", b"x")], "the members of sample 'a' are not adjacent"),
        ([("k.png", b"x")], r"1 ids appear more than once in 'WebDataset key', e.g. 'k'"),
    ],
)
def test_webdataset_problems_stop_the_job_before_any_work(
    tmp_path: Path, second: list[tuple[str, bytes]], message: str
) -> None:
    write_tar(tmp_path / "0.tar", [("k.png", b"x")])
    write_tar(tmp_path / "1.tar", second)
    with pytest.raises(ManifestError, match=message):
        open_manifest(InputConfig(path=str(tmp_path), format="webdataset"))


def test_a_truncated_tar_stops_the_job_before_any_work(tmp_path: Path) -> None:
    whole = write_tar(tmp_path / "whole.tar", [("a.png", image(0)), ("b.png", image(1))])
    with tarfile.open(whole) as tar:
        last = tar.getmembers()[-1]
    (tmp_path / "cut.tar").write_bytes(whole.read_bytes()[: last.offset_data + last.size // 2])  # mid-member
    whole.unlink()
    with pytest.raises(ManifestError, match=r"cut.tar: not a readable tar archive: unexpected end of data"):
        open_manifest(InputConfig(path=str(tmp_path), format="webdataset"))


def test_saved_hf_dataset_gives_one_row_per_image(tiny_model: Path, ray_local, tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {"id": datasets.Value("string"), "image": datasets.Image(), "label": datasets.Value("int64")}
    )
    (tmp_path / "on-disk.png").write_bytes(image(3))
    data = {
        "id": ["p0", "p1", "p2", "from-path", "broken"],
        "image": [
            {"bytes": image(0), "path": None},
            {"bytes": image(1, "JPEG"), "path": "p1.jpg"},
            {"bytes": image(2), "path": None},
            str(tmp_path / "on-disk.png"),  # save_to_disk embeds it
            {"bytes": GARBAGE, "path": None},
        ],
        "label": [0, 1, 2, 3, 4],
    }
    datasets.Dataset.from_dict(data, features=features).save_to_disk(tmp_path / "saved")

    result = run(job_config(tiny_model, tmp_path / "saved", tmp_path / "out", input={"format": "hf"}))

    rows = {row["id"]: row for row in read_output(tmp_path / "out").to_pylist()}
    assert sorted(rows) == sorted(data["id"])
    for key in ("p0", "p1", "p2", "from-path"):
        assert rows[key]["status"] == schema.OK and rows[key]["text"] is not None, rows[key]
    assert (rows["broken"]["status"], rows["broken"]["error"]) == (schema.LOAD_ERROR, "not a recognised image file")
    assert {key: row["label"] for key, row in rows.items()} == dict(zip(data["id"], data["label"], strict=True))
    assert rows["p1"]["image"] == "p1.jpg"
    assert result.summary["output"]["status"] == {schema.OK: 4, schema.LOAD_ERROR: 1}


def test_load_dataset_builder_reads_an_image_folder(ray_local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`imagefolder` keeps images as paths: the rows carry them for the load stage to read."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for index in range(3):
        (folder / "sub" / f"{index}.png").write_bytes(image(index))
    (folder / "metadata.csv").write_text(
        "file_name,id,caption\n" + "".join(f"sub/{i}.png,img-{i},caption {i}\n" for i in range(3))
    )
    config = InputConfig(path=str(folder), format="hf", hf_builder="imagefolder")

    manifest = open_manifest(config)
    rows = sorted(read_manifest(manifest, config).take_all(), key=lambda row: row["id"])

    assert manifest.rows == 3
    assert [row["id"] for row in rows] == ["img-0", "img-1", "img-2"]
    assert [row["image"] for row in rows] == [str(folder / "sub" / f"{i}.png") for i in range(3)]
    assert [row[schema.IMAGE_BYTES] for row in rows] == [None] * 3
    assert [row["caption"] for row in rows] == [f"caption {i}" for i in range(3)]

    with pytest.raises(ManifestError, match=r"dataset has no id column 'key' \(columns: image, id, caption\)"):
        open_manifest(config.model_copy(update={"id_column": "key"}))
