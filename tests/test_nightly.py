"""Nightly runs: date templates, a finished partition skipped, an unfinished one resumed, new files added."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest
import yaml

from qwenbatch import schema
from qwenbatch.cli import main
from qwenbatch.config import ConfigError, load_config
from qwenbatch.dates import parse_date, render, with_date
from tests.helpers import job_config, read_output, write_images, write_manifest

DAY = date(2026, 11, 25)
SMALL = [(48, 40), (64, 64), (40, 56)]


def test_render_date_templates() -> None:
    assert render("/in/{date}/", DAY) == "/in/2026-11-25/"
    assert render("s3://b/out/{date:%Y/%m/%d}", DAY) == "s3://b/out/2026/11/25"
    assert render("/x/{date:%Y}/{date}.parquet", DAY) == "/x/2026/2026-11-25.parquet"
    assert render("s3://b/{region}/{dates}/{date:%j}", DAY) == "s3://b/{region}/{dates}/329"
    assert render("/plain/path", DAY) == "/plain/path"


def test_parse_date() -> None:
    today = date(2026, 3, 1)
    assert parse_date("2026-11-25", today) == DAY
    assert parse_date(None, today) == today
    assert parse_date("today", today) == today
    assert parse_date(" Yesterday ", today) == date(2026, 2, 28)
    assert parse_date(None) == date.today()
    for bad in ("25.11.2026", "2026-13-01", "tomorrow"):
        with pytest.raises(ConfigError, match="--date"):
            parse_date(bad, today)


def test_with_date_renders_input_list_and_output_only(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            "model=m",
            "input.path=['/in/{date}/a.parquet', '/in/static.parquet']",
            "output.path=/out/{date:%Y/%m/%d}",
            "task.kind=custom",
            "task.prompt=Is this {date}?",
        ],
    )
    dated = with_date(config, DAY)
    assert dated.input.path == ["/in/2026-11-25/a.parquet", "/in/static.parquet"]
    assert dated.output.path == "/out/2026/11/25"
    assert dated.task.prompt == "Is this {date}?"  # only paths are templates
    assert config.output.path == "/out/{date:%Y/%m/%d}"  # the original is untouched


def test_cli_date_applies_after_overrides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "input": {"path": "/in/{date}"}, "output": {"path": "/unused"}}))
    assert main(["config", str(path), "output.path=/out/{date:%Y/%m/%d}", "--date", "2026-11-25"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["input"]["path"], shown["output"]["path"]) == ("/in/2026-11-25", "/out/2026/11/25")
    assert main(["config", str(path), "--date", "11/25/2026"]) == 2
    assert "--date '11/25/2026'" in capsys.readouterr().err


def _rows(images: list[Path], prefix: str) -> list[dict]:
    return [{"id": f"{prefix}-{i}", "image": str(p)} for i, p in enumerate(images)]


def _nightly_config(tmp_path: Path, model: Path) -> Path:
    """A config whose paths hold date templates, as a nightly cron line would use it."""
    base = job_config(
        model,
        tmp_path / "in/{date}",
        tmp_path / "out/{date:%Y/%m/%d}",
        generation={"max_new_tokens": 4},
        image={"allowed_prefixes": [str(tmp_path)]},
    )
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(base.model_dump(mode="json")))
    return path


def _by_id(folder: Path) -> dict[str, dict]:
    return {row["id"]: row for row in read_output(folder).to_pylist()}


def test_nightly_partition_skipped_forced_and_resumed(
    tmp_path: Path, tiny_model: Path, ray_local, capsys: pytest.CaptureFixture
) -> None:
    images = write_images(tmp_path / "images", 7, sizes=SMALL)
    write_manifest(tmp_path / "in/2026-11-25/a.parquet", _rows(images[:4], "d25a"))
    write_manifest(tmp_path / "in/2026-11-26/a.parquet", _rows(images[4:6], "d26a"))
    config = str(_nightly_config(tmp_path, tiny_model))
    out = tmp_path / "out/2026/11/25"

    assert main(["run", config, "--date", "2026-11-25"]) == 0
    first = _by_id(out)
    assert sorted(first) == [f"d25a-{i}" for i in range(4)]  # that day's manifests only
    assert {row["status"] for row in first.values()} == {schema.OK}
    assert not (tmp_path / "out/2026/11/26").exists()
    summary = json.loads((out / schema.SUMMARY_FILE).read_text())
    assert summary["state"] == "succeeded" and (out / schema.SUCCESS_FILE).exists()

    capsys.readouterr()
    assert main(["run", config, "--date", "2026-11-25"]) == 0  # finished partition: skipped
    assert "already complete" in capsys.readouterr().out
    assert json.loads((out / schema.SUMMARY_FILE).read_text())["run_id"] == summary["run_id"]

    # A new manifest file lands in the same day's folder: 2 good rows and 1 whose image is gone.
    new_rows = _rows(images[4:6], "d25b") + [{"id": "d25b-missing", "image": str(tmp_path / "gone.png")}]
    write_manifest(tmp_path / "in/2026-11-25/b.parquet", new_rows)
    code = main(["run", config, "--date", "2026-11-25", "--force", "--max-error-rate", "0.1"])
    second = json.loads((out / schema.SUMMARY_FILE).read_text())
    assert (second["this_run"]["rows"], second["skipped_done"], second["manifest_rows"]) == (3, 4, 7)
    rows = _by_id(out)
    assert len(read_output(out)) == len(rows) == 7  # every id exactly once
    assert {i: rows[i]["run_id"] for i in first} == {i: summary["run_id"] for i in first}  # old rows untouched
    assert {rows[r["id"]]["run_id"] for r in new_rows} == {second["run_id"]}
    assert [rows[r["id"]]["status"] for r in new_rows] == [schema.OK, schema.OK, schema.LOAD_ERROR]
    # 1 failed row of 7 is over --max-error-rate: the forced run withdrew the old _SUCCESS and did not restore it.
    assert code == 1 and second["state"] == "failed"
    assert not (out / schema.SUCCESS_FILE).exists()

    # An unfinished partition resumes without --force: the next night's rerun runs only what is missing.
    write_manifest(tmp_path / "in/2026-11-25/c.parquet", _rows(images[6:], "d25c"))
    assert main(["run", config, "--date", "2026-11-25"]) == 0
    third = json.loads((out / schema.SUMMARY_FILE).read_text())
    assert (third["this_run"]["rows"], third["skipped_done"], third["state"]) == (1, 7, "succeeded")
    rows = _by_id(out)
    assert len(read_output(out)) == len(rows) == 8
    assert rows["d25c-0"]["run_id"] == third["run_id"] and rows["d25c-0"]["status"] == schema.OK
    assert {r["run_id"] for i, r in rows.items() if i != "d25c-0"} == {summary["run_id"], second["run_id"]}
    assert (out / schema.SUCCESS_FILE).exists()
