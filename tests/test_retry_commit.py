"""A retry's swap of new rows for old error rows, killed at each of its steps: readers never see an id twice,
and the next run leaves exactly the new rows (or, killed before the journal, exactly the old ones).

No Ray, no model: real shards and indexes on local disk and on a real S3 server (moto), a real process
that SIGKILLs itself at the step (`QWENBATCH_TEST_KILL_AT`), the real readers afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from qwenbatch import retry, schema, storage
from qwenbatch.config import StorageConfig
from qwenbatch.shards import list_shards, write_shard
from qwenbatch.summary import summarize_output
from tests.helpers import REPO, moto_s3

os.environ.setdefault("AWS_ACCESS_KEY_ID", "qwenbatch-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "qwenbatch-test")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

BUCKET = "retries"
STEPS = ("before-journal", "journal", "shard", "index", "journal-removed")
OLD, NEW = "run-old", "run-new"


def rows(*items: tuple[str, str, int | None], run_id: str) -> pa.Table:
    """Output rows as the writer leaves them: id, page, status, error, text, run_id."""
    ids, statuses, pages = zip(*items, strict=True)
    return pa.table(
        {
            schema.ID: pa.array(ids, pa.string()),
            schema.PAGE: pa.array(pages, pa.int32()),
            schema.STATUS: pa.array(statuses, pa.string()),
            schema.ERROR: pa.array([None if s == schema.OK else f"{s} of {i}" for i, s, _ in items], pa.string()),
            schema.TEXT: pa.array([f"{run_id}: {i}" if s == schema.OK else None for i, s, _ in items], pa.string()),
            schema.RUN_ID: pa.array([run_id] * len(items), pa.string()),
        }
    )


OK, LOAD, INFER = schema.OK, schema.LOAD_ERROR, schema.INFER_ERROR
# Shard a: two error rows among ok ones. Shard b: all ok, never touched. Shard c: a PDF with one failed
# page (its whole document is done again) and a PDF that failed whole, which now has pages.
SHARDS = {
    "a": rows(("a0", OK, None), ("a1", LOAD, None), ("a2", OK, None), ("a3", INFER, None), run_id=OLD),
    "b": rows(("b0", OK, None), ("b1", OK, None), run_id=OLD),
    "c": rows(("doc#p1", OK, 1), ("doc#p2", INFER, 2), ("pdf", LOAD, None), ("c0", OK, None), run_id=OLD),
}
RETRIED = rows(
    ("a1", OK, None),
    ("a3", OK, None),
    ("doc#p1", OK, 1),
    ("doc#p2", OK, 2),
    ("pdf#p1", OK, 1),
    ("pdf#p2", INFER, 2),
    run_id=NEW,
)
BEFORE = {i: OLD for t in SHARDS.values() for i in t.column(schema.ID).to_pylist()}
AFTER = {i: r for i, r in BEFORE.items() if i not in {"a1", "a3", "doc#p1", "doc#p2", "pdf"}}
AFTER |= dict.fromkeys(RETRIED.column(schema.ID).to_pylist(), NEW)


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    with moto_s3(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An output with the shards above, and a retry run's new rows written to its retry folder."""
    if request.param == "local":
        location = str(tmp_path / "out")
    else:
        endpoint = request.getfixturevalue("s3")
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        location = f"s3://{BUCKET}/{tmp_path.name}/out"
    storage.configure(StorageConfig())
    fs, base = storage.resolve(location)
    for table in SHARDS.values():
        write_shard(fs, base, table, schema.ID)
    _, staging = storage.resolve(retry.staging(location, NEW))
    write_shard(fs, staging, RETRIED, schema.ID)
    yield location
    os.environ.pop("AWS_ENDPOINT_URL", None)
    storage.configure(StorageConfig())


def seen(location: str) -> dict[str, str]:
    """What a reader of the output folder sees: each id's run, with every id exactly once (pyarrow, pandas)."""
    fs, base = storage.resolve(location)
    table = pads.dataset(base, filesystem=fs, format="parquet").to_table()
    counts = Counter(table.column(schema.ID).to_pylist())
    assert all(n == 1 for n in counts.values()), f"ids seen twice: {[i for i, n in counts.items() if n > 1]}"
    frame = pd.read_parquet(base, filesystem=fs)
    assert sorted(frame[schema.ID]) == sorted(counts)
    return dict(zip(table.column(schema.ID).to_pylist(), table.column(schema.RUN_ID).to_pylist(), strict=True))


def plan(location: str) -> retry.RetryPlan:
    return retry.plan_retry(location, schema.ID, schema.ERROR_STATUSES)


def test_the_plan_names_the_error_rows_documents_and_shards(output: str) -> None:
    found = plan(output)
    assert found.rows == 4  # a1, a3, doc#p2, pdf
    fs, base = storage.resolve(output)
    held = {shard.path.rsplit("/", 1)[-1]: set(_ids(fs, shard.path)) for shard in list_shards(fs, base)}
    assert set(found.shards) == {name for name, ids in held.items() if ids & {"a1", "pdf"}} and len(held) == 3
    only_load = retry.plan_retry(output, schema.ID, (schema.LOAD_ERROR,))
    assert only_load.rows == 2 and only_load.keys.rows == 2  # a1 and pdf


def _ids(fs, path: str) -> list[str]:
    return pads.dataset(path, filesystem=fs, format="parquet").to_table().column(schema.ID).to_pylist()


def test_a_commit_swaps_exactly_the_retried_rows_in(output: str) -> None:
    shards = plan(output).shards
    assert seen(output) == BEFORE  # the retry folder is invisible to readers
    assert retry.commit(output, NEW, shards, schema.ID) == 2
    assert seen(output) == AFTER
    totals = summarize_output(output)  # the rewritten indexes: status and report read these
    assert totals["rows"] == len(AFTER) and totals["status"] == {OK: len(AFTER) - 1, INFER: 1}
    assert totals["inputs"] == 9  # a0-a3, b0, b1, doc, pdf, c0
    fs, base = storage.resolve(output)
    assert not storage.list_folders(fs, storage.join(base, schema.RETRY_DIR))


@pytest.mark.parametrize("step", STEPS)
def test_killed_at_each_step_readers_see_each_id_once_and_the_next_run_finishes(output: str, step: str) -> None:
    shards = plan(output).shards
    code = f"from qwenbatch import retry; retry.commit({output!r}, {NEW!r}, {shards!r}, {schema.ID!r})"
    env = os.environ | {schema.TEST_KILL_ENV: step, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr

    runs = seen(output)  # after the kill, before any recovery: one row per id, old or new
    assert set(runs) in (set(BEFORE), set(AFTER)), runs  # shard c swapped whole, or not yet
    assert retry.recover(output, schema.ID) == (0 if step in ("before-journal", "journal-removed") else 1)
    assert seen(output) == (BEFORE if step == "before-journal" else AFTER)
    totals = summarize_output(output)
    expected = BEFORE if step == "before-journal" else AFTER
    assert totals["rows"] == len(expected)
    assert totals["status"].get(OK, 0) == (len(expected) - 4 if step == "before-journal" else len(expected) - 1)
    fs, base = storage.resolve(output)
    assert not storage.list_folders(fs, storage.join(base, schema.RETRY_DIR))
