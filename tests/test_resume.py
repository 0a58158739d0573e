"""Resume and idempotence: reruns finish the job exactly once; the summary and _SUCCESS tell the truth.

The SIGKILL test runs `qwenbatch run` as a separate process with its own Ray (its own temp dir), kills
its whole process group mid-run, and reruns the same command. The other tests share the session Ray.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq

from qwenbatch import schema
from qwenbatch.cli import main
from qwenbatch.config import load_config
from qwenbatch.pipeline import TASK_CPUS, Placement
from qwenbatch.summary import VERSIONED
from tests.helpers import (
    KILL_TIMEOUT_S,
    encode,
    kill_at_first_shard,
    noise_image,
    private_ray_dirs,
    read_output,
    start_run,
    wait_for_exit,
    write_images,
    write_job,
    write_killable_job,
    write_manifest,
)

ROWS = 96  # enough that a kill at the first shard lands mid-run (shards land a few at a time)


def output_files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir() if p.name.startswith("part-")}


# --- summary, _SUCCESS, --max-error-rate, and reruns over a finished output ----------------------


def test_error_rate_summary_and_reruns(tmp_path: Path, tiny_model: Path, ray_local) -> None:
    good = write_images(tmp_path / "images", 4, sizes=[(64, 64), (80, 48)])
    bad = []
    for index in range(4):
        path = tmp_path / "images" / f"broken_{index}.png"
        path.write_bytes(encode(noise_image(64, 64, index), "PNG")[:60] if index % 2 else b"not an image")
        bad.append(path)
    rows = [{"id": p.stem, "image": str(p)} for p in good + bad]
    job = write_job(tmp_path / "job.yaml", tiny_model, write_manifest(tmp_path / "m.parquet", rows), tmp_path / "out")
    out = tmp_path / "out"

    # Half the rows are bad: every row is written, but over --max-error-rate the run fails.
    assert main(["run", str(job), "--max-error-rate", "0.1"]) == 1
    assert sorted(read_output(out).column("id").to_pylist()) == sorted(r["id"] for r in rows)
    assert not (out / schema.SUCCESS_FILE).exists()
    summary = json.loads((out / schema.SUMMARY_FILE).read_text())
    assert summary["state"] == "failed" and summary["error_rate"] == 0.5 and summary["max_error_rate"] == 0.1
    assert summary["run_id"] and set(read_output(out).column(schema.RUN_ID).to_pylist()) == {summary["run_id"]}
    assert summary["config"]["input"]["path"] == str(tmp_path / "m.parquet")
    assert summary["config"]["generation"]["max_new_tokens"] == 8
    assert set(summary["versions"]) == set(VERSIONED) and all(summary["versions"].values())
    assert summary["manifest_rows"] == 8 and summary["skipped_done"] == 0
    this_run = summary["this_run"]
    assert this_run["rows"] == 8 and this_run["status"] == {schema.OK: 4, schema.LOAD_ERROR: 4}
    assert this_run["images_per_s"] > 0 and this_run["output_tokens"] >= 4 and this_run["input_tokens"] > 0
    assert summary["output"]["status"] == {schema.OK: 4, schema.LOAD_ERROR: 4}
    top = sorted(summary["output"]["top_errors"], key=lambda item: item["error"])
    assert top == [
        {"error": "cannot decode PNG: image file is truncated", "count": 2},
        {"error": "not a recognised image file", "count": 2},
    ]
    parts = output_files(out)

    # The same command without the error-rate limit: nothing left to do, and now the run succeeds.
    assert main(["run", str(job)]) == 0
    summary = json.loads((out / schema.SUMMARY_FILE).read_text())
    assert summary["state"] == "succeeded" and summary["this_run"]["rows"] == 0 and summary["skipped_done"] == 8
    assert (out / schema.SUCCESS_FILE).stat().st_mtime_ns >= (out / schema.SUMMARY_FILE).stat().st_mtime_ns
    assert output_files(out) == parts

    # Complete: a plain rerun skips; --force reruns over it, processes 0 rows and changes nothing.
    assert main(["run", str(job)]) == 0
    assert main(["run", str(job), "--force"]) == 0
    summary = json.loads((out / schema.SUMMARY_FILE).read_text())
    assert summary["this_run"]["rows"] == 0 and summary["skipped_done"] == 8 and summary["state"] == "succeeded"
    assert output_files(out) == parts
    assert sorted(read_output(out).column("id").to_pylist()) == sorted(r["id"] for r in rows)


# --- SIGKILL mid-run, then the same command again --------------------------------------------------


def test_small_local_ray_leaves_a_cpu_for_the_tasks(tmp_path: Path, tiny_model: Path) -> None:
    """On 2 CPUs (the Ray `qwenbatch run` starts below) the actors must not hold both: reads would wait forever."""
    config = load_config(write_job(tmp_path / "job.yaml", tiny_model, tmp_path / "m.parquet", tmp_path / "out"))
    placement = Placement.for_cluster(config, cluster_gpus=0, cluster_cpus=2)
    infer_cpus = 1  # one model replica on CPU
    assert infer_cpus + placement.cpu_workers * placement.loader_cpus <= 2 - TASK_CPUS
    roomy = Placement.for_cluster(config, cluster_gpus=0, cluster_cpus=8)
    assert (roomy.cpu_workers, roomy.loader_cpus) == (6, 1)


def test_sigkill_mid_run_then_rerun_finishes_exactly_once(tmp_path: Path, tiny_model: Path) -> None:
    job_dir, out, log = tmp_path / "job", tmp_path / "out", tmp_path / "job.log"
    paths = write_images(job_dir / "images", ROWS, sizes=[(64, 64), (96, 64), (64, 96)])
    for part in range(ROWS // 4):  # many manifest files: many blocks, so shards land one by one
        chunk = paths[part * 4 : (part + 1) * 4]
        write_manifest(job_dir / "manifests" / f"m{part:02d}.parquet", [{"id": p.stem, "image": str(p)} for p in chunk])
    job = write_killable_job(tmp_path / "job.yaml", tiny_model, job_dir / "manifests", out, job_dir / "images")
    with private_ray_dirs(2) as (first_dir, second_dir):
        killed_at = kill_at_first_shard(job, out, log, first_dir)

        # What a reader sees after the kill: whole shards only, under their final names.
        before = read_output(out)
        for part in out.glob("part-*.parquet"):
            pq.read_table(part)
        assert len(set(before.column(schema.RUN_ID).to_pylist())) == 1
        done_before = dict(zip(before.column("id").to_pylist(), before.column(schema.RUN_ID).to_pylist(), strict=True))
        assert 0 < len(done_before) < ROWS, f"the kill should land mid-run; {len(done_before)} rows were done"
        assert not (out / schema.SUMMARY_FILE).exists() and not (out / schema.SUCCESS_FILE).exists()
        stale = out / f"{schema.TEMP_PREFIX}0123-part-killed.parquet"
        stale.write_bytes(b"PAR1 half a file")  # what a writer killed mid-write leaves
        assert read_output(out).num_rows == len(done_before)  # readers skip it

        second = start_run(job, log, second_dir)
        assert second.wait(timeout=KILL_TIMEOUT_S) == 0, log.read_text()[-3000:]
        # Nothing of the killed job outlives it for long: not even workers that were only starting.
        assert not wait_for_exit(first_dir, killed_at + 60), "the killed job left processes behind"
        assert not wait_for_exit(second_dir, time.monotonic() + 60), "a finished job left processes behind"

    after = read_output(out)
    ids = after.column("id").to_pylist()
    assert len(ids) == ROWS and set(ids) == {p.stem for p in paths}  # every row, exactly once
    summary = json.loads((out / schema.SUMMARY_FILE).read_text())
    assert summary["state"] == "succeeded" and (out / schema.SUCCESS_FILE).exists()
    assert summary["skipped_done"] == len(done_before)
    assert summary["this_run"]["rows"] == ROWS - len(done_before)
    run_ids = dict(zip(ids, after.column(schema.RUN_ID).to_pylist(), strict=True))
    assert {i: run_ids[i] for i in done_before} == done_before  # rows done before the kill were not redone
    assert {run_ids[i] for i in set(ids) - set(done_before)} == {summary["run_id"]}
    assert set(after.column(schema.STATUS).to_pylist()) == {schema.OK}
    names = {p.name for p in out.iterdir()}
    assert not {n for n in names if n.startswith(".")}  # the stale temp file is gone
    assert names - {n for n in names if n.startswith("part-")} == {
        schema.SUMMARY_FILE,
        schema.SUCCESS_FILE,
        schema.INDEX_DIR,
    }
    shards = {n for n in names if n.startswith("part-")}
    assert {p.name for p in (out / schema.INDEX_DIR).iterdir()} == shards  # every shard has its index, nothing else
