"""Exactly-once for PDFs: a document's page rows are written together, in one shard, and its id is in that
shard's index; a run killed mid-way, then rerun, ends with every page exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from qwenbatch import schema
from qwenbatch.documents import DocumentGate, resume_keys
from tests.helpers import (
    KILL_TIMEOUT_S,
    kill_at_first_shard,
    private_ray_dirs,
    read_output,
    start_run,
    write_killable_job,
    write_manifest,
)
from tests.pdfs import make_pdf

DOCUMENTS = 48  # enough that a kill at the first shard lands mid-run


def page_rows(document: str, pages: list[int], of: int) -> pa.Table:
    return pa.table(
        {
            "id": [f"{document}#p{p}" for p in pages],
            schema.PAGE: pa.array(pages, pa.int32()),
            schema.DOCUMENT: [document] * len(pages),
            schema.DOCUMENT_ROWS: pa.array([of] * len(pages), pa.int32()),
        }
    )


def plain_rows(ids: list[str]) -> pa.Table:
    return pa.table(
        {
            "id": ids,
            schema.PAGE: pa.nulls(len(ids), pa.int32()),
            schema.DOCUMENT: pa.nulls(len(ids), pa.string()),
            schema.DOCUMENT_ROWS: pa.nulls(len(ids), pa.int32()),
        }
    )


def test_gate_holds_a_document_until_all_its_rows_came() -> None:
    gate = DocumentGate()
    first = pa.concat_tables([plain_rows(["img"]), page_rows("a", [1, 2], 3), page_rows("b", [1], 1)])
    assert gate.admit(first).column("id").to_pylist() == ["img", "b#p1"]
    assert gate.held_rows == 2
    assert gate.admit(page_rows("a", [3], 3)).column("id").to_pylist() == ["a#p1", "a#p2", "a#p3"]
    assert gate.held_rows == 0
    assert gate.admit(page_rows("c", [2], 2)).num_rows == 0
    gate.drop_held()  # a run that ends with c unfinished writes none of it: the next run does c again
    assert gate.held_rows == 0


def test_resume_keys_hold_each_document_once() -> None:
    table = pa.concat_tables([plain_rows(["img", "doc-error"]), page_rows("a", [1, 2, 3], 3)])
    keys, inputs = resume_keys(table.drop_columns([schema.DOCUMENT, schema.DOCUMENT_ROWS]), "id")
    assert sorted(keys.to_pylist()) == sorted(["img", "doc-error", "a#p1", "a#p2", "a#p3", "a"])
    assert inputs == 3  # img, doc-error and the document a


def test_killed_run_then_rerun_writes_every_page_exactly_once(tmp_path: Path, tiny_model: Path) -> None:
    job_dir, out, log = tmp_path / "job", tmp_path / "out", tmp_path / "job.log"
    (job_dir / "docs").mkdir(parents=True)
    pages = {}
    for index in range(DOCUMENTS):
        count = 2 + index % 3
        path = job_dir / "docs" / f"doc{index:02d}.pdf"
        path.write_bytes(make_pdf([(200 + 40 * p, 260) for p in range(count)], seed=index))
        pages[path.stem] = count
    for part in range(DOCUMENTS // 4):  # many manifest files: many blocks, so shards land one by one
        names = [f"doc{i:02d}" for i in range(4 * part, 4 * part + 4)]
        rows = [{"id": n, "image": str(job_dir / "docs" / f"{n}.pdf")} for n in names]
        write_manifest(job_dir / "manifests" / f"m{part}.parquet", rows)
    job = write_killable_job(tmp_path / "job.yaml", tiny_model, job_dir / "manifests", out, job_dir / "docs")
    with private_ray_dirs(2) as (first_dir, second_dir):
        kill_at_first_shard(job, out, log, first_dir)

        # What the kill left: whole documents only, each in a single shard.
        before = read_output(out)
        documents_before = {row_id.split("#p")[0] for row_id in before.column("id").to_pylist()}
        assert 0 < len(documents_before) < DOCUMENTS, f"the kill should land mid-run: {len(documents_before)} done"
        for shard in out.glob("part-*.parquet"):
            ids = pq.read_table(shard, columns=["id"]).column("id").to_pylist()
            for document in {i.split("#p")[0] for i in ids}:
                assert sum(i.startswith(f"{document}#p") for i in ids) == pages[document], (shard.name, document)
        run_of = dict(zip(before.column("id").to_pylist(), before.column(schema.RUN_ID).to_pylist(), strict=True))

        second = start_run(job, log, second_dir)
        assert second.wait(timeout=KILL_TIMEOUT_S) == 0, log.read_text()[-3000:]

    after = read_output(out)
    ids = after.column("id").to_pylist()
    expected = {f"{document}#p{p}" for document, count in pages.items() for p in range(1, count + 1)}
    assert len(ids) == len(expected) and set(ids) == expected  # every page, exactly once
    assert set(after.column(schema.STATUS).to_pylist()) == {schema.OK}
    summary = json.loads((out / schema.SUMMARY_FILE).read_text())
    assert summary["state"] == "succeeded" and summary["skipped_done"] == len(documents_before)
    assert summary["this_run"]["inputs"] == DOCUMENTS - len(documents_before)
    again = dict(zip(ids, after.column(schema.RUN_ID).to_pylist(), strict=True))
    assert {i: again[i] for i in run_of} == run_of  # pages written before the kill were not redone
