"""Rows that kill their worker: real worker deaths (SIGSEGV) in a real `qwenbatch run`, 50 good rows around them.

The deaths come from the test hook `attempts.die_if_told`, switched on by the environment variable the
test gives the job. Before the attempt ledger, Ray retried such a row without end and the run hung.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from qwenbatch import schema
from tests.helpers import job_data, read_output, start_run, stop_group, write_images, write_manifest

GOOD_ROWS = 50
RUN_BOUND_S = 420  # a run with five worker deaths on 2 busy cores; without the ledger it never ends


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
    run = start_run(job, log, tempfile.mkdtemp(prefix="qb-ray-", dir="/tmp"), {schema.TEST_DIE_ENV: die_on})
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
