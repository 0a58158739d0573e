"""One writer per output: the lease, on a local folder and on a real S3 server (moto) on loopback.

The lease's own rules run in-process on real files and a real server; then real `qwenbatch run`
processes race for one output, and a run frozen past its lease's timeout (a straggler) is resumed
after its rerun finished: it must write no shard beside the rerun's rows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from qwenbatch import schema, storage
from qwenbatch.config import StorageConfig
from qwenbatch.lease import Holder, Lease, LeaseHeld, LeaseLost
from tests.helpers import job_data, moto_s3, private_ray_dirs, start_run, stop_group, write_images, write_manifest

os.environ.setdefault("AWS_ACCESS_KEY_ID", "qwenbatch-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "qwenbatch-test")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

BUCKET = "leases"
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    with moto_s3(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "out")
        return
    endpoint = request.getfixturevalue("s3")
    storage.configure(StorageConfig(endpoint_url=endpoint))
    try:
        yield f"s3://{BUCKET}/{tmp_path.name}/out"
    finally:
        storage.configure(StorageConfig())


def lease_data(output: str) -> dict | None:
    fs, base = storage.resolve(output)
    path = storage.join(base, schema.LEASE_FILE)
    if not storage.exists(fs, path):
        return None
    with fs.open_input_stream(path) as handle:
        return json.loads(handle.read())


def test_one_holder_then_a_stale_lease_is_taken_over(output: str, caplog) -> None:
    first = Lease.acquire(output, "run-a", timeout_s=2.0)
    assert lease_data(output)["run_id"] == "run-a"
    with pytest.raises(LeaseHeld, match=r"is being written by run run-a \(host .+, pid \d+, last renewed \d+s ago\)"):
        Lease.acquire(output, "run-b", timeout_s=2.0)
    time.sleep(1.5)  # longer than the timeout would allow, had the first not renewed
    with pytest.raises(LeaseHeld):
        Lease.acquire(output, "run-b", timeout_s=2.0)

    first.stopped.set()  # the first run freezes: no more renewals
    first.thread.join()
    time.sleep(3.5)  # past the timeout, by the store's clock (S3 keeps whole seconds)
    second = Lease.acquire(output, "run-b", timeout_s=2.0)
    assert "took over the lease" in caplog.text and "not renewed in 2s" in caplog.text
    assert lease_data(output)["run_id"] == "run-b"
    with pytest.raises(LeaseLost, match="no longer holds the output's lease"):
        first.ensure_held()  # the straggler's writer asks before publishing a shard
    first.release()  # a lost lease is not given back: it is the second run's
    assert lease_data(output)["run_id"] == "run-b"
    second.ensure_held()
    second.release()
    assert lease_data(output) is None


def test_a_lease_whose_process_is_gone_is_taken_over_at_once(tmp_path: Path, caplog) -> None:
    """After a kill -9 on this host the rerun need not wait for the timeout."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    holder = Holder("run-killed", Holder.this_process("x").host, dead.pid, time.time() - 5, time.time())
    (out / schema.LEASE_FILE).write_bytes(holder.encode())
    lease = Lease.acquire(str(out), "run-new", timeout_s=600)
    assert "from run run-killed" in caplog.text and "its process is gone" in caplog.text
    lease.release()
    alive = Holder("run-alive", holder.host, os.getpid(), time.time() - 5, time.time())
    (out / schema.LEASE_FILE).write_bytes(alive.encode())
    with pytest.raises(LeaseHeld, match="run run-alive"):
        Lease.acquire(str(out), "run-new", timeout_s=600)


# --- real `qwenbatch run` processes ------------------------------------------------------------


def write_job(
    tmp_path: Path, model: Path, rows: int, out: str, shard_rows: int | None = None, **sections: dict
) -> tuple[Path, set[str]]:
    paths = write_images(tmp_path / "images", rows, sizes=[(64, 64), (96, 64), (64, 96)])
    for part in range(0, rows, 4):  # many files: many blocks, so shards land one by one
        rows_here = [{"id": p.stem, "image": str(p)} for p in paths[part : part + 4]]
        write_manifest(tmp_path / "manifests" / f"m{part:03d}.parquet", rows_here)
    job = tmp_path / "job.yaml"
    data = job_data(model, tmp_path / "manifests", out, **sections)
    data["image"]["allowed_prefixes"] = [str(tmp_path / "images")]  # not below the manifests' folder
    if shard_rows:
        data["output"]["shard_rows"] = shard_rows
    job.write_text(json.dumps(data))
    return job, {p.stem for p in paths}


@pytest.mark.parametrize("below", ["", "/out"], ids=["the file", "below the file"])
def test_an_output_path_that_is_a_file_is_one_line(below: str, tmp_path: Path) -> None:
    """A file where the output folder should be, or above it, stops `qwenbatch run` in one line before Ray
    starts (the lease would make the folder), and the file is left as it was."""
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    job, _ = write_job(tmp_path, tmp_path / "model", 1, f"{taken}{below}")
    env = os.environ | {"RAY_TMPDIR": str(tmp_path / "ray")}
    command = [sys.executable, "-m", "qwenbatch.cli", "run", str(job)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    shown = f"{taken}{below}: {taken}" if below else str(taken)
    assert done.stderr == f"qwenbatch: error: output.path: {shown} is a file, not a folder\n"
    assert taken.read_text() == "mine" and not (tmp_path / "ray").exists()


def output_ids(output: str, endpoint: str | None = None) -> list[str]:
    fs, base = storage.resolve(output, StorageConfig(endpoint_url=endpoint))
    table = pads.dataset(base, filesystem=fs, format="parquet").to_table(columns=["id", schema.STATUS])
    assert set(table.column(schema.STATUS).to_pylist()) <= {schema.OK}, "every row of these jobs generates"
    return table.column("id").to_pylist()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_runs_started_at_once_on_one_output(where: str, tmp_path: Path, tiny_model: Path, request) -> None:
    endpoint = request.getfixturevalue("s3") if where == "s3" else None
    output = f"s3://{BUCKET}/{tmp_path.name}/out" if endpoint else str(tmp_path / "out")
    job, ids = write_job(tmp_path, tiny_model, 16, output)
    env = {"AWS_ENDPOINT_URL": endpoint} if endpoint else {}
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    with private_ray_dirs(2) as ray_dirs:
        runs = [start_run(job, log, ray_dir, env) for log, ray_dir in zip(logs, ray_dirs, strict=True)]
        try:
            codes = [run.wait(timeout=JOB_TIMEOUT_S) for run in runs]
        finally:
            for run in runs:
                stop_group(run)
    texts = [log.read_text() for log in logs]
    assert sorted(codes) == [0, 1], texts
    loser = texts[codes.index(1)]
    errors = [line for line in loser.splitlines() if line.startswith("qwenbatch: error:")]
    assert len(errors) == 1, loser
    assert f"{output} is being written by run " in errors[0] and "not starting a second writer" in errors[0]
    assert "Traceback" not in loser
    found = output_ids(output, endpoint)
    assert sorted(found) == sorted(ids)  # every row, exactly once
    storage.configure(StorageConfig(endpoint_url=endpoint))
    try:
        assert lease_data(output) is None  # the winner gave it back
    finally:
        storage.configure(StorageConfig())


def test_a_frozen_run_resumed_after_its_rerun_writes_nothing(tmp_path: Path, tiny_model: Path) -> None:
    """The straggler: a run frozen (SIGSTOP, as a paused VM) past its lease's timeout, a rerun that takes
    the lease over and finishes, then the frozen run resumed: it finds the lease gone and writes no shard."""
    out = tmp_path / "out"
    job, ids = write_job(
        tmp_path,
        tiny_model,
        96,
        str(out),
        run={"batch_size": 2, "lease_timeout_s": 5},
        shard_rows=4,
        generation={"max_new_tokens": 16, "min_new_tokens": 16},
    )
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    with private_ray_dirs(2) as ray_dirs:
        first = start_run(job, first_log, ray_dirs[0])
        second = None
        try:
            deadline = time.monotonic() + JOB_TIMEOUT_S
            # Frozen between two shards, not inside the publication of one (a temp file, the shard, then its
            # index): the gap docs/errors-and-reruns.md admits, where a straggler may still publish the shard it
            # had started.
            while True:
                assert first.poll() is None, first_log.read_text()[-3000:]
                assert time.monotonic() < deadline, first_log.read_text()[-3000:]
                if list(out.glob("part-*.parquet")):
                    os.killpg(first.pid, signal.SIGSTOP)
                    indexed = all((out / schema.INDEX_DIR / p.name).exists() for p in out.glob("part-*.parquet"))
                    temp = f"{schema.TEMP_PREFIX}*"
                    writing = [*out.glob(temp), *(out / schema.INDEX_DIR).glob(temp)]
                    if indexed and not writing:
                        break
                    os.killpg(first.pid, signal.SIGCONT)
                time.sleep(0.05)
            before = set(output_ids(str(out)))
            assert 0 < len(before) < len(ids)
            time.sleep(6)  # past the timeout
            second = start_run(job, second_log, ray_dirs[1])
            assert second.wait(timeout=JOB_TIMEOUT_S) == 0, second_log.read_text()[-3000:]
            shards_after_rerun = {p.name: p.stat().st_mtime for p in out.glob("part-*.parquet")}
            os.killpg(first.pid, signal.SIGCONT)
            code = first.wait(timeout=JOB_TIMEOUT_S)
        finally:
            for run in (first, second):
                if run is not None:
                    stop_group(run)  # SIGKILL ends a stopped process too
    second_text, first_text = second_log.read_text(), first_log.read_text()
    assert "took over the lease" in second_text and "not renewed in 5s" in second_text, second_text[-3000:]
    assert code == 1, first_text[-3000:]
    assert "no longer holds the output's lease" in first_text, first_text[-3000:]
    # Nothing of the straggler landed after it resumed: the same shards, and every row exactly once.
    assert {p.name: p.stat().st_mtime for p in out.glob("part-*.parquet")} == shards_after_rerun
    found = output_ids(str(out))
    assert sorted(found) == sorted(ids)
    summary = json.loads((out / schema.SUMMARY_FILE).read_text())
    assert summary["state"] == "succeeded" and summary["skipped_done"] == len(before)
    assert lease_data(str(out)) is None
