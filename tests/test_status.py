"""`qwenbatch status` on real outputs: one real run, then the folder states a run leaves behind."""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from qwenbatch import schema
from qwenbatch.cli import main
from qwenbatch.pipeline import run
from qwenbatch.status import NoRunError, duration_text, format_status, read_status
from tests.helpers import job_config, read_output, write_images, write_manifest


@pytest.fixture(scope="module")
def failed_output(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, ray_local) -> Path:
    """A real run of 4 rows, one of them a missing file, judged failed by --max-error-rate 0."""
    root = tmp_path_factory.mktemp("status")
    images = write_images(root / "images", 3, sizes=[(48, 40), (64, 64)])
    rows = [{"id": f"r{i}", "image": str(p)} for i, p in enumerate(images)]
    write_manifest(root / "manifest.parquet", [*rows, {"id": "r-missing", "image": str(root / "gone.png")}])
    config = job_config(tiny_model, root / "manifest.parquet", root / "out", generation={"max_new_tokens": 4})
    result = run(config, max_error_rate=0.0)
    assert result.summary["state"] == "failed"
    return root / "out"


def _copy(src: Path, dst: Path, *, data_only: bool = False) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_*") if data_only else None)
    return dst


def test_failed_run(failed_output: Path, capsys: pytest.CaptureFixture) -> None:
    status = read_status(str(failed_output))
    assert status.state == "failed" and status.shards >= 1
    assert status.totals["status"] == {schema.OK: 3, schema.LOAD_ERROR: 1}

    assert main(["status", str(failed_output)]) == 1
    table = capsys.readouterr().out
    assert "state      failed" in table
    assert "rows       4 of 4 in the manifest (this run 4; 0 already done)" in table
    assert "images/s" in table and "output tokens/s" in table
    lines = table.splitlines()
    run_line = next(line for line in lines if line.startswith("run "))  # to the second, for people
    when, took = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", r"(\d+ s|\d+ min \d\d s|\d+ h \d\d min)"
    assert re.search(f": started {when}, took {took}, finished {took} ago$", run_line), run_line
    busy = next(line for line in lines if "busy" in line)  # the replica ran on the CPU: no GPU to speak of
    assert busy.startswith("replica busy ") and "gpu" not in table.lower()
    assert any(line.split() == [schema.OK, "3", "75.00%"] for line in lines)
    assert any(line.split() == [schema.LOAD_ERROR, "1", "25.00%"] for line in lines)
    message = next(r["error"] for r in read_output(failed_output).to_pylist() if r["id"] == "r-missing")
    assert lines[lines.index("top errors") + 1].split() == ["1", "x", *message.split()]


def test_succeeded_run_and_json(
    failed_output: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = _copy(failed_output, tmp_path / "out")
    rerun = run(job_config(tiny_model, failed_output.parent / "manifest.parquet", out))  # no error-rate limit now
    assert rerun.summary["state"] == "succeeded" and rerun.summary["this_run"]["rows"] == 0

    assert main(["status", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "succeeded" and shown["run_id"] == rerun.summary["run_id"]
    assert shown["output_rows"]["rows"] == 4 and shown["manifest_rows"] == 4

    # Killed between the summary and the marker: the summary alone does not make a run succeeded.
    (out / schema.SUCCESS_FILE).unlink()
    assert read_status(str(out)).state == "partial"
    assert main(["status", str(out)]) == 1


def test_running(failed_output: Path, tmp_path: Path) -> None:
    # Shards and no summary yet: what a run in progress (or one killed mid-way) leaves.
    live = _copy(failed_output, tmp_path / "live", data_only=True)
    status = read_status(str(live))
    assert status.state == "running" and status.summary is None
    assert status.totals["rows"] == 4 and status.totals["status"][schema.LOAD_ERROR] == 1  # counted from shards
    now = status.last_write + timedelta(seconds=75)
    table = format_status(status, now=now)
    assert "state      running" in table and "last write 1 min 15 s ago" in table
    assert f"4 rows written so far, shards: {status.shards}" in table

    # A later run writing shards after the last summary: running again, the old summary shown as the last run.
    stale = _copy(failed_output, tmp_path / "stale")
    summary = stale / schema.SUMMARY_FILE
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).timestamp()
    os.utime(summary, (hour_ago, hour_ago))
    status = read_status(str(stale))
    assert status.state == "running" and status.summary is not None
    assert f"last run   {status.summary['run_id']}" in format_status(status)


def test_gpu_replicas_are_gpu_busy(failed_output: Path, tmp_path: Path) -> None:
    """The same output with its replica's device set to cuda, as a GPU run records it."""
    out = _copy(failed_output, tmp_path / "gpu")
    summary = json.loads((out / schema.SUMMARY_FILE).read_text())
    for replica in summary["replicas"]["each"]:
        replica["device"] = "cuda"
    (out / schema.SUMMARY_FILE).write_text(json.dumps(summary))
    os.utime(out / schema.SUMMARY_FILE)  # still newer than the shards: the run stays finished
    table = format_status(read_status(str(out)))
    assert f"gpu busy   {summary['gpu_busy']:.1%} over 1 replica: " in table and "replica busy" not in table


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.4, "0 s"),
        (57.351, "57 s"),
        (59.6, "1 min 00 s"),
        (192, "3 min 12 s"),
        (3725, "1 h 02 min"),
        (3599.6, "1 h 00 min"),
    ],
)
def test_durations_read_as_people_say_them(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text


def test_no_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(NoRunError):
        read_status(str(tmp_path))
    assert main(["status", str(tmp_path / "nothing")]) == 2
    assert "no run found" in capsys.readouterr().err
