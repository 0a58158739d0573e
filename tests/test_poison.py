"""Rows that kill their worker: real worker deaths (SIGSEGV) in a real `qwenbatch run`, 50 good rows around them.

The deaths come from the test hook `attempts.die_if_told`, switched on by the environment variable the
test gives the job. Before the attempt ledger, Ray retried such a row without end and the run hung.
"""

from __future__ import annotations

import faulthandler
import json
import multiprocessing
import signal
import time
from pathlib import Path

import pytest

from qwenbatch import attempts, schema
from qwenbatch.attempts import AttemptLedger, Guard, die_if_told
from tests.helpers import job_data, private_ray_dirs, read_output, start_run, stop_group, write_images, write_manifest

GOOD_ROWS = 50
RUN_BOUND_S = 420  # a run with seven worker deaths on 2 busy cores; without the ledger it never ends


def test_rows_that_kill_their_worker_end_as_error_rows(tmp_path: Path, tiny_model: Path) -> None:
    special = ["poison-load", "poison-infer", "dies-once"]
    paths = write_images(tmp_path / "images", GOOD_ROWS + len(special), sizes=[(64, 64), (96, 64)])
    ids = [f"good-{i:02d}" for i in range(GOOD_ROWS)]
    ids[10:10] = special[:1]  # among the good rows, not at an edge
    ids[30:30] = special[1:2]
    ids[31:31] = special[2:]  # in the poison row's block: a death there kills both
    rows = [{"id": row, "image": str(path)} for row, path in zip(ids, paths, strict=True)]
    for part in range(0, len(rows), 9):  # several files: several blocks
        write_manifest(tmp_path / "manifests" / f"m{part:03d}.parquet", rows[part : part + 9])
    job = tmp_path / "job.yaml"
    job.write_text(
        json.dumps(
            job_data(tiny_model, tmp_path / "manifests", tmp_path / "out", image={"allowed_prefixes": [str(tmp_path)]})
        )
    )
    once = tmp_path / "died-once"
    die_on = f"load:poison-load,infer:poison-infer,infer:dies-once:{once}"

    log = tmp_path / "run.log"
    started = time.monotonic()
    with private_ray_dirs(1) as (ray_dir,):
        run = start_run(job, log, ray_dir, {schema.TEST_DIE_ENV: die_on})
        try:
            code = run.wait(timeout=RUN_BOUND_S)
        finally:
            stop_group(run)
    elapsed = time.monotonic() - started

    assert code == 0, log.read_text()[-4000:]
    assert elapsed < RUN_BOUND_S
    assert once.exists()  # the replica really died once on that row
    table = read_output(tmp_path / "out").to_pylist()
    by_id = {row["id"]: row for row in table}
    assert len(table) == len(ids) and set(by_id) == set(ids)  # one row per input
    died = "the worker died twice while processing this row"
    assert (by_id["poison-load"]["status"], by_id["poison-load"]["error"]) == (schema.LOAD_ERROR, died)
    assert (by_id["poison-infer"]["status"], by_id["poison-infer"]["error"]) == (schema.INFER_ERROR, died)
    assert by_id["dies-once"]["status"] == schema.OK and by_id["dies-once"]["text"]  # succeeded on its retry
    for row in ids[: GOOD_ROWS + 3]:
        if row.startswith("good"):
            assert (by_id[row]["status"], by_id[row]["error"]) == (schema.OK, None), by_id[row]
    assert not (tmp_path / "out" / schema.ATTEMPTS_FOLDER).exists()  # the ledger goes with the run


def guarded_until_done(ledger: AttemptLedger, ids: list[str]) -> tuple[dict[int, str], list[int]]:
    """Ray's part, with real processes: a call in a fresh process, called again each time its process dies."""
    context = multiprocessing.get_context("fork")
    deaths = []
    for _ in range(10):
        results = context.Queue()

        def call(results=results) -> None:
            faulthandler.disable()  # pytest's: its stack dumps of the expected deaths would only be noise
            work = lambda keys: {k: (die_if_told("load", [ids[k]]), "ok")[1] for k in keys}  # noqa: E731
            results.put(Guard(ledger, "load").run(list(range(len(ids))), ids, work, died=lambda: "died"))

        process = context.Process(target=call)
        process.start()
        process.join()
        if process.exitcode == 0:
            return results.get(timeout=10), deaths
        deaths.append(process.exitcode)
    raise AssertionError(f"still dying after {deaths}")


def test_a_row_is_given_up_after_two_deaths_alone_and_a_row_that_died_once_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = ["a", "poison", "b", "once", "c"]
    monkeypatch.setenv(schema.TEST_DIE_ENV, f"load:poison,load:once:{tmp_path / 'once'}")
    ledger = AttemptLedger.for_run(str(tmp_path / "out"), "run-1", "load")

    results, deaths = guarded_until_done(ledger, ids)

    assert results == {0: "ok", 1: "died", 2: "ok", 3: "ok", 4: "ok"}
    # in the block, then twice alone (never a third time), then once alone for the row that dies once
    assert deaths == [-signal.SIGSEGV] * 4
    attempts.remove_all(str(tmp_path / "out"))
    assert not (tmp_path / "out" / schema.ATTEMPTS_FOLDER).exists()
