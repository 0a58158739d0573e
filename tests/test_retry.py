"""A nightly's reruns as a user meets them through `qwenbatch run`: a run of mostly failed rows fails, its
errors are retried once they can succeed (each new row replacing its error row), a complete output says so
and names --retry-errors, a grown manifest is picked up without --force, and a retry killed mid-swap is
finished by the next run. Readers (pyarrow, pandas, `ray.data.read_parquet`, `qwenbatch status`) see one
row per id throughout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from qwenbatch import schema
from qwenbatch.cli import main
from tests.helpers import REPO, private_ray_dirs, read_output, wait_for_exit, write_images, write_job, write_manifest


def one_row_per_id(out: Path, with_ray: bool = True) -> dict[str, dict]:
    """Every reader of the folder agrees: each id once. The rows by id."""
    table = read_output(out)
    ids = table.column(schema.ID).to_pylist()
    assert max(Counter(ids).values()) == 1, Counter(ids).most_common(3)
    assert sorted(pd.read_parquet(out)[schema.ID]) == sorted(ids)
    if with_ray:  # in the session's Ray
        import ray

        assert sorted(ray.data.read_parquet(str(out)).to_pandas()[schema.ID]) == sorted(ids)
    return {row[schema.ID]: row for row in table.to_pylist()}


def test_retry_errors_cli(tmp_path: Path, tiny_model: Path, ray_local, capsys: pytest.CaptureFixture[str]) -> None:
    images = write_images(tmp_path / "images", 8, sizes=[(64, 64), (80, 48)])
    late = images[2:6]  # files that arrive after the first run: their rows fail with "not found" until then
    held = {path: path.read_bytes() for path in late}
    for path in late:
        path.unlink()
    manifest = write_manifest(tmp_path / "m" / "m.parquet", [{"id": p.stem, "image": str(p)} for p in images[:6]])
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", tiny_model, manifest, out, image={"allowed_prefixes": [str(tmp_path)]})

    # 4 of 6 rows fail: over the default limit (half), the run fails and says why.
    assert main(["run", str(job)]) == 1
    printed = capsys.readouterr().out
    assert printed.startswith(f"failed: {out}") and "67% of the output's rows are errors" in printed, printed
    assert "4 x file not found" in printed and "--retry-errors" in printed, printed
    assert not (out / schema.SUCCESS_FILE).exists()
    first = one_row_per_id(out)
    first_run = json.loads((out / schema.SUMMARY_FILE).read_text())["run_id"]

    # Three files arrive: their rows are retried, each new row replacing the old; the fourth fails again.
    for path in late[:3]:
        path.write_bytes(held[path])
    assert main(["run", str(job), "--retry-errors=load_error"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"succeeded: {out}") and "(this run: 4 rows" in printed, printed
    second = one_row_per_id(out)
    summary = json.loads((out / schema.SUMMARY_FILE).read_text())
    assert set(second) == set(first) and summary["output"]["status"] == {schema.OK: 5, schema.LOAD_ERROR: 1}
    for key, row in second.items():
        retried = first[key][schema.STATUS] != schema.OK
        assert row[schema.RUN_ID] == (summary["run_id"] if retried else first_run), (key, row)
        assert row[schema.STATUS] == (schema.LOAD_ERROR if key == late[3].stem else schema.OK), row
        if not retried:
            assert row == first[key]  # rows that were fine are untouched
    assert not (out / schema.RETRY_DIR).exists() or not any((out / schema.RETRY_DIR).iterdir())

    # Complete, with one error: a rerun does nothing and says how to retry it.
    assert main(["run", str(job)]) == 0
    assert capsys.readouterr().out.startswith(
        f"already complete: {out} (every manifest row is done; 1 error row: pass --retry-errors to run it again)"
    )

    # The manifest grows: the new rows are processed without --force, the error row left as it is.
    late[3].write_bytes(held[late[3]])
    rows = [{"id": p.stem, "image": str(p)} for p in images]
    write_manifest(manifest, rows)
    assert main(["run", str(job)]) == 0
    printed = capsys.readouterr().out
    assert "(this run: 2 rows" in printed and "6 already done" in printed, printed
    third = one_row_per_id(out)
    assert set(third) == {p.stem for p in images} and third[late[3].stem][schema.STATUS] == schema.LOAD_ERROR

    # `status` reads the same output: 8 rows, 1 error.
    assert main(["status", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "succeeded" and status["output_rows"]["status"] == {schema.OK: 7, schema.LOAD_ERROR: 1}


def test_a_retry_killed_while_swapping_is_finished_by_the_next_run(tmp_path: Path, tiny_model: Path) -> None:
    """The real command, killed by SIGKILL right after its first rewritten shard (before its index)."""
    images = write_images(tmp_path / "images", 4, sizes=[(64, 64)])
    rows = [{"id": p.stem, "image": str(p)} for p in images] + [{"id": "late", "image": str(tmp_path / "late.png")}]
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m" / "m.parquet", rows)
    job = write_job(tmp_path / "job.yaml", tiny_model, manifest, out, image={"allowed_prefixes": [str(tmp_path)]})
    with private_ray_dirs(3) as ray_dirs:

        def cli(*args: str, kill_at: str | None = None, ray_dir: str) -> subprocess.CompletedProcess:
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
            env |= {"RAY_TMPDIR": ray_dir, "PYTHONPATH": str(REPO)}
            env |= {schema.TEST_KILL_ENV: kill_at} if kill_at else {}
            command = [sys.executable, "-m", "qwenbatch.cli", "run", str(job), *args]
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
            wait_for_exit(ray_dir, 0)  # a killed driver's Ray: gone before the next run starts its own
            return done

        assert cli(ray_dir=ray_dirs[0]).returncode == 0  # 1 error of 5: succeeded
        before = one_row_per_id(out, with_ray=False)
        (tmp_path / "late.png").write_bytes(images[0].read_bytes())
        killed = cli("--retry-errors", kill_at="shard", ray_dir=ray_dirs[1])
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        swapped = one_row_per_id(out, with_ray=False)  # the shard holds the new row; its index still the old stats
        assert set(swapped) == set(before) and swapped["late"][schema.STATUS] == schema.OK
        assert (out / schema.RETRY_DIR).exists()

        again = cli(ray_dir=ray_dirs[2])
        assert again.returncode == 0, again.stderr[-3000:]
        assert "finishing the retry a killed run left" in again.stderr
        after = one_row_per_id(out, with_ray=False)
        assert after == swapped and not any((out / schema.RETRY_DIR).iterdir())
        summary = json.loads((out / schema.SUMMARY_FILE).read_text())
        assert summary["state"] == "succeeded" and summary["output"]["status"] == {schema.OK: 5}
