"""Millions of rows: ids compared as hashes in parts, shards with their indexes, a writer that streams.

Scale is simulated by shrinking the sizes that switch the large-input paths on (`schema.ID_PART_ROWS`,
the writer's limits), so the same code runs as at 100M ids, on real files and a real local Ray.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwenbatch import ids, inputs, schema, shards, storage
from qwenbatch.config import InputConfig, OutputConfig
from qwenbatch.inputs import IdCheck, ManifestError, check_ids, find_todo
from qwenbatch.lease import LeaseLost
from qwenbatch.pipeline import run
from qwenbatch.read import block_rows, open_manifest, read_units
from qwenbatch.write import ShardLimits, ShardWriter, finalize_batch
from tests.helpers import job_config, job_data, read_output, wait_for_exit, write_images, write_manifest

PROVENANCE = {"model": "m", "task": "caption", "run_id": "run-1"}


def output_rows(ids_: list[str], statuses: list[str] | None = None) -> pa.Table:
    statuses = statuses or [schema.OK] * len(ids_)
    failed = [s != schema.OK for s in statuses]
    table = pa.table(
        {
            "id": ids_,
            "image": [f"/data/{i}.jpg" for i in ids_],
            schema.TEXT: [None if f else f"text {i}" for i, f in zip(ids_, failed, strict=True)],
            schema.STATUS: statuses,
            schema.ERROR: [f"file not found: /data/{i}.jpg" if f else None for i, f in zip(ids_, failed, strict=True)],
            schema.OUTPUT_TOKENS: pa.array([None if f else 3 + n % 5 for n, f in enumerate(failed)], pa.int32()),
            schema.IMAGE_TOKENS: pa.array([None if f else 64 for f in failed], pa.int32()),
            schema.INPUT_TOKENS: pa.array([None if f else 80 for f in failed], pa.int32()),
            schema.FINISH_REASON: [None if f else schema.FINISH_STOP for f in failed],
        }
    )
    return finalize_batch(table, **PROVENANCE)


# --- ids in parts ---------------------------------------------------------------------------------


def test_hashes_do_not_depend_on_chunking_or_type() -> None:
    whole = ids.hash_ids(pa.array(["a", "bb", "ccc", "", "ünï"]))
    chunked = ids.hash_ids(pa.chunked_array([pa.array(["x", "a", "bb"]).slice(1), pa.array(["ccc", "", "ünï"])]))
    large = ids.hash_ids(pa.array(["a", "bb", "ccc", "", "ünï"], pa.large_string()))
    assert whole.hi.tolist() == chunked.hi.tolist() == large.hi.tolist()
    assert whole.lo.tolist() == chunked.lo.tolist() == large.lo.tolist()
    assert ids.hash_ids(pa.array([7, 8])).hi.tolist() == ids.hash_ids(pa.array(["7", "8"])).hi.tolist()
    assert len(set(zip(whole.hi.tolist(), whole.lo.tolist(), strict=True))) == 5


@pytest.mark.parametrize("part_rows", [None, 3], ids=["in memory", "in parts on disk"])
def test_duplicates_found_the_same_in_parts(part_rows: int | None) -> None:
    rng = random.Random(5)
    values = [f"id-{n}" for n in range(200)]
    repeated = ["id-17", "id-3", "id-150", "id-3", "id-99", "id-42", "id-17", "id-7"]  # 6 distinct ids
    rng.shuffle(values)
    chunks = [values[:90], repeated, values[90:]]
    check = IdCheck("id", sum(map(len, chunks)), part_rows=part_rows)
    for chunk in chunks:
        check.add(pa.array(chunk))
    assert check.sorter.bits == (0 if part_rows is None else 7)  # 208 ids in parts of about 3
    everything = [v for chunk in chunks for v in chunk]
    with pytest.raises(ManifestError) as error:
        check.finish(lambda rows: [everything[r] for r in rows])
    first_seen = sorted({v for v in repeated}, key=everything.index)[: inputs.DUPLICATE_EXAMPLES]
    examples = ", ".join(repr(v) for v in first_seen)
    assert str(error.value) == f"6 ids appear more than once in 'id', e.g. {examples}"
    assert check.sorter.folder is None or not os.path.exists(check.sorter.folder.path)  # the parts are gone


class FakeDone:
    """An output's done ids, sorted in parts as `shards.DoneIndex` gives them; records the parts asked for."""

    def __init__(self, done: list[str]) -> None:
        self.done = pa.array(done, pa.string())
        self.rows = len(done)
        self.asked: list[ids.SortedIds] = []

    def sorted(self, bits: int) -> ids.SortedIds:
        sorter = ids.IdSorter(self.rows, split_bits=bits)
        for start in range(0, self.rows, 7):  # in small pieces, as indexes come
            sorter.add(ids.hash_ids(self.done.slice(start, 7)))
        self.asked.append(sorter.finish())
        return self.asked[-1]


@pytest.mark.parametrize("part_rows", [None, 4, 1000], ids=["in memory", "both in parts", "done set in parts"])
def test_rows_left_to_do_are_the_same_in_parts(monkeypatch: pytest.MonkeyPatch, part_rows: int | None) -> None:
    manifest_ids = [f"m{n:03d}" for n in range(60)]
    done_ids = [f"m{n:03d}" for n in range(0, 60, 3)] + [f"old{n}" for n in range(2000)]  # older ids too
    if part_rows:
        monkeypatch.setattr(schema, "ID_PART_ROWS", part_rows)
    files = [manifest_ids[:25], manifest_ids[25:]]
    check = IdCheck("id", 60)
    for names in files:
        check.add(pa.array(names))
    manifest = inputs.Manifest(None, ["a", "b"], ["id"], ((25,), (35,)), check.finish(lambda rows: []))
    done = FakeDone(done_ids)
    todo = find_todo(manifest, done)
    assert todo.rows == 40
    pairs = zip(files, todo.keep, strict=True)
    left = [name for names, keep in pairs for name, k in zip(names, keep, strict=True) if k]
    assert left == [n for n in manifest_ids if n not in set(done_ids)]
    (parts,) = done.asked
    assert parts.bits == {None: 0, 4: 9, 1000: 2}[part_rows]  # as fine as the larger set needs
    assert parts.closed and parts.folder is None  # its parts, on disk or in memory, are gone once used


SPILLED_AND_LEFT = """
import gc, os, sys
import pyarrow as pa
from qwenbatch import ids
sorter = ids.IdSorter(1_000, split_bits=2)
sorter.add(ids.hash_ids(pa.array([str(n) for n in range(1_000)])))
parts = sorter.finish()
folder = parts.folder.path
print(folder, os.path.exists(folder), flush=True)
if sys.argv[1] == "dropped":  # nothing holds the parts any more, and the process goes on
    del sorter, parts
    gc.collect()
    print(folder, os.path.exists(folder), flush=True)
"""


@pytest.mark.parametrize("how", ["exit", "dropped"])
def test_spilled_id_parts_never_outlive_their_process(how: str) -> None:
    """A run that stops between the id check and its use of the ids (an error, a held lease) leaves no parts."""
    done = subprocess.run([sys.executable, "-c", SPILLED_AND_LEFT, how], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in done.stdout.splitlines()]
    assert lines[0][1] == "True"  # spilled to disk, as a large check does
    folder = lines[0][0]
    assert not os.path.exists(folder)
    if how == "dropped":
        assert lines[1] == [folder, "False"]  # gone while the process still ran


def test_check_ids_keeps_its_messages() -> None:
    with pytest.raises(ManifestError, match=r"^1 rows have a null or empty 'key'; every row needs a unique id$"):
        check_ids(pa.chunked_array([pa.array(["a", None])]), "key")
    assert check_ids(pa.array(["a", "b"]), "id").rows == 2


# --- shards and their indexes ----------------------------------------------------------------------


def test_a_shard_is_checked_at_its_publication_and_not_before(tmp_path: Path) -> None:
    """The writer's last lease check runs once the shard is encoded and on disk under a temp name, just
    before the rename: a run frozen past its lease anywhere before that point publishes nothing."""
    fs, base = storage.resolve(str(tmp_path / "out"))
    folder = Path(base)
    seen: list[list[str]] = []

    def lost() -> None:
        seen.append(sorted(p.name for p in folder.iterdir()))
        (temp,) = folder.glob(f"{schema.TEMP_PREFIX}*")
        assert pq.read_table(temp).num_rows == 50  # the whole shard is written before the check
        raise LeaseLost("taken over")

    with pytest.raises(LeaseLost):
        shards.write_shard(fs, base, output_rows([f"r{n}" for n in range(50)]), "id", lost)
    assert len(seen) == 1 and all(name.startswith(schema.TEMP_PREFIX) for name in seen[0])
    assert list(folder.iterdir()) == []  # no shard, no index, no temp file

    checked: list[int] = []
    shards.write_shard(fs, base, output_rows(["a", "b"]), "id", lambda: checked.append(1))
    assert checked == [1] and len(shards.list_shards(fs, base)) == 1


def test_a_shard_index_holds_what_the_shard_holds(tmp_path: Path) -> None:
    fs, base = storage.resolve(str(tmp_path / "out"))
    names = [f"r{n:03d}" for n in range(300)]
    statuses = [schema.LOAD_ERROR if n % 7 == 0 else schema.OK for n in range(300)]
    written = shards.write_shard(fs, base, output_rows(names, statuses), "id")
    (shard,) = shards.list_shards(fs, base)
    assert shard.index is not None and shard.mtime is not None
    assert Path(shard.path).name == Path(shard.index).name and Path(shard.index).parent.name == schema.INDEX_DIR

    stored = shards.read_stats(fs, [shard])[0]
    from_columns = shards.shard_stats(pq.read_table(shard.path))
    assert stored == written == json.loads(json.dumps(from_columns))
    assert stored["rows"] == 300 and stored["status"] == {schema.OK: 257, schema.LOAD_ERROR: 43}
    assert stored["reasons_count"] == {"file not found: …": 43} and stored["runs"] == {"run-1": 300}
    assert sum(stored["output_tokens_hist"].values()) == 257

    # The index's hashes, whole and in parts by the top bits.
    done = shards.DoneIndex(fs, [shard], [stored])
    expected = ids.hash_ids(pa.array(names)).sorted()
    everything = done.sorted(0).part(0).hashes
    assert everything.hi.tolist() == expected.hi.tolist() and everything.lo.tolist() == expected.lo.tolist()
    in_parts = done.sorted(2)
    for part in range(4):
        low, high = ids.part_range(part, 2)
        assert in_parts.part(part).hashes.hi.tolist() == [h for h in expected.hi.tolist() if low <= h <= high]
    in_parts.close()

    # The same rows written again land under the same name; a shard whose index is lost gets it back.
    rewritten = shards.write_shard(fs, base, output_rows(list(reversed(names)), list(reversed(statuses))), "id")
    assert [s.path for s in shards.list_shards(fs, base)] == [shard.path]
    os.remove(shard.index)
    (bare,) = shards.list_shards(fs, base)
    assert bare.index is None and shards.read_stats(fs, [bare])[0] == rewritten  # read from the shard itself
    (again,) = shards.add_missing_indexes(fs, base, [bare], "id")
    assert again.index == shard.index and shards.read_stats(fs, [again])[0] == rewritten


def test_shard_writer_limits_and_errors(tmp_path: Path) -> None:
    out = tmp_path / "out"
    names = [f"r{n:03d}" for n in range(35)]
    raw = output_rows(names).drop_columns([schema.MODEL, schema.TASK, schema.RUN_ID])

    by_rows = ShardWriter(str(out / "rows"), "id", ShardLimits(rows=10, seconds=60), **PROVENANCE)
    for start in range(0, 35, 5):
        by_rows.put(raw.slice(start, 5))
    totals = by_rows.close()
    sizes = sorted(pq.read_metadata(p).num_rows for p in (out / "rows").glob("part-*.parquet"))
    assert sizes == [5, 10, 10, 10]  # the first shard at once, then by rows
    assert totals["rows"] == 35 and totals["shards"] == 4 and totals["status"] == {schema.OK: 35}
    assert sorted(read_output(out / "rows").column("id").to_pylist()) == names
    assert set(read_output(out / "rows").column(schema.RUN_ID).to_pylist()) == {"run-1"}

    by_age = ShardWriter(str(out / "age"), "id", ShardLimits(rows=1000, seconds=0.3), **PROVENANCE)
    for start in range(0, 35, 5):
        by_age.put(raw.slice(start, 5))
        time.sleep(0.5)  # rows trickle in slower than the age limit
    assert len(list((out / "age").glob("part-*.parquet"))) >= 6  # written while rows still came in
    assert by_age.close()["rows"] == 35
    assert sorted(read_output(out / "age").column("id").to_pylist()) == names

    (tmp_path / "blocked").write_text("a file where the output folder should be")
    failing = ShardWriter(str(tmp_path / "blocked"), "id", ShardLimits(), **PROVENANCE)
    with pytest.raises(RuntimeError, match="writing a shard failed"):
        for start in range(0, 35, 5):
            failing.put(raw.slice(start, 5))
            time.sleep(0.1)
        failing.close()


def test_limits_come_from_the_config() -> None:
    limits = ShardLimits.of(OutputConfig(path="/o", shard_rows=5, shard_mb=2, shard_seconds=600))
    assert (limits.rows, limits.bytes, limits.seconds) == (5, 2 * 2**20, 600)
    assert [limits.age(k) for k in range(7)] == [0, 30, 60, 120, 240, 480, 600]
    assert ShardLimits().age(50) == schema.DEFAULT_SHARD_SECONDS


# --- reading only what is left ---------------------------------------------------------------------


def test_reading_skips_row_groups_with_nothing_left(tmp_path: Path) -> None:
    rows = [{"id": f"r{n:03d}", "image": f"/x/{n}.png"} for n in range(30)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet", row_group_size=10)
    pq.write_table(pa.Table.from_pylist([{"id": "z", "image": "/x/z.png"}]), tmp_path / "n.parquet")
    manifest = open_manifest(InputConfig(path=str(tmp_path)))
    assert manifest.file_groups == ((10, 10, 10), (1,)) and manifest.rows == 31
    done = FakeDone([f"r{n:03d}" for n in range(20)] + ["r025"])
    todo = find_todo(manifest, done)
    units = read_units(manifest, todo)
    assert [(Path(u["file"]).name, u["row_group"]) for u in units] == [("m.parquet", 2), ("n.parquet", 0)]
    keep = np.unpackbits(np.frombuffer(units[0]["keep"], np.uint8), count=10).astype(bool)
    assert keep.tolist() == [n != 5 for n in range(10)] and units[1]["keep"] is None


def test_blocks_grow_with_the_work() -> None:
    budget, window = 16 * schema.PIXELS_PER_TOKEN, 4000
    assert block_rows(40, 1, budget, window) == schema.MIN_BLOCK_ROWS
    assert block_rows(2_000, 1, budget, window) == 2_000 // schema.BLOCKS_PER_WORKER
    assert block_rows(2_000, 8, budget, window) == 50  # 62 by the work, down to a divisor of the window
    assert block_rows(10_000_000, 1, budget, window) == 1_000  # MAX_BLOCK_ROWS, down to a divisor
    big = block_rows(10_000_000, 1, schema.DEFAULT_MAX_PIXELS, window)
    assert big * 3 * schema.DEFAULT_MAX_PIXELS <= schema.LOAD_BLOCK_BYTES and window % big == 0
    assert block_rows(10_000_000, 1, budget, 128) == 128  # one infer window at most
    assert block_rows(100, 1, budget, 8) == 8


def test_blocks_fill_whole_windows() -> None:
    """Blocks that do not add up to a window leave the replica odd calls: small batches, each a whole GPU pass."""
    budget = 64 * schema.PIXELS_PER_TOKEN
    assert block_rows(640, 1, schema.DEFAULT_MAX_PIXELS, 128) == 16  # 25 rows fit LOAD_BLOCK_BYTES: 16 divides 128
    assert block_rows(2_000, 1, budget, 128) == 128
    assert block_rows(400, 1, budget, 96) == 96 and block_rows(300, 1, budget, 96) == 48  # 75 by the work
    assert block_rows(10_000, 1, budget, 28) == 28  # 14 divides 28, but a block holds at least MIN_BLOCK_ROWS
    for window in (8, 28, 96, 100, 128, 4096):
        for rows in (1, 100, 10_000, 10_000_000):
            assert window % block_rows(rows, 2, budget, window) == 0


# --- the job -------------------------------------------------------------------------------------


def test_resume_with_ids_in_parts(tmp_path: Path, tiny_model: Path, ray_local, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume where the manifest's ids and the output's are both split into parts, as past 8M ids."""
    paths = write_images(tmp_path / "images", 6, sizes=[(48, 40), (64, 64)])
    rows = [{"id": f"r{n:02d}", "image": str(paths[n % len(paths)])} for n in range(20)]
    write_manifest(tmp_path / "in" / "a.parquet", rows[:12])
    image = {"allowed_prefixes": [str(tmp_path / "images")]}  # the images lie beside the manifests' folder
    config = job_config(tiny_model, tmp_path / "in", tmp_path / "out", generation={"max_new_tokens": 2}, image=image)
    first = run(config)
    assert first.succeeded and first.summary["this_run"]["rows"] == 12

    write_manifest(tmp_path / "in" / "b.parquet", rows[12:])
    monkeypatch.setattr(schema, "ID_PART_ROWS", 3)
    asked: list[int] = []
    in_parts = shards.DoneIndex.sorted
    monkeypatch.setattr(shards.DoneIndex, "sorted", lambda self, bits: asked.append(bits) or in_parts(self, bits))
    second = run(config, force=True)

    assert asked == [ids.part_bits(20, 3)] and asked[0] > 1  # the ids were compared a part of their hashes at a time
    assert second.succeeded and second.summary["this_run"]["rows"] == 8 and second.summary["skipped_done"] == 12
    table = read_output(tmp_path / "out")
    assert sorted(table.column("id").to_pylist()) == [r["id"] for r in rows]  # every row exactly once
    run_of = dict(zip(table.column("id").to_pylist(), table.column(schema.RUN_ID).to_pylist(), strict=True))
    assert {run_of[r["id"]] for r in rows[:12]} == {first.summary["run_id"]}
    assert {run_of[r["id"]] for r in rows[12:]} == {second.summary["run_id"]}


STREAMING_JOB = """
import json, sys, time
import ray
ray.init(num_cpus=2, include_dashboard=False)  # a 2-CPU node, whatever this machine has
from qwenbatch import pipeline
from qwenbatch.infer import Generator

class Timed(Generator):
    LOG = sys.argv[2]  # taken along by value to the actor's process

    def __call__(self, batch):
        done = super().__call__(batch)
        with open(self.LOG, "a") as log:
            log.write(f"{time.time()}\\n")
        return done

pipeline.Generator = Timed
from qwenbatch.cli import main
sys.exit(main(["run", sys.argv[1]]))
"""


def test_shards_land_while_the_run_goes_on_a_2_cpu_node(tmp_path: Path, tiny_model: Path) -> None:
    """One manifest file on a 2-CPU Ray: shards land long before the run's last batch, not all at its end."""
    rows = 240
    paths = write_images(tmp_path / "images", 8, sizes=[(48, 40), (64, 64)])
    write_manifest(tmp_path / "m.parquet", [{"id": f"r{n:03d}", "image": str(paths[n % 8])} for n in range(rows)])
    data = job_data(
        tiny_model,
        tmp_path / "m.parquet",
        tmp_path / "out",
        generation={"max_new_tokens": 64, "min_new_tokens": 64},
        run={"batch_size": 2},
    )
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(data))
    batches = tmp_path / "batches.log"
    ray_dir = tempfile.mkdtemp(prefix="qb-ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")} | {"RAY_TMPDIR": ray_dir}
    try:
        done = subprocess.run(
            [sys.executable, "-c", STREAMING_JOB, str(job), str(batches)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        wait_for_exit(ray_dir, time.monotonic() + 30)
        shutil.rmtree(ray_dir, ignore_errors=True)

    ends = sorted(float(line) for line in batches.read_text().split())
    written = sorted(p.stat().st_mtime for p in (tmp_path / "out").glob("part-*.parquet"))
    assert len(read_output(tmp_path / "out")) == rows
    span = ends[-1] - ends[0]
    when = f"batches {ends[0]:.1f}..{ends[-1]:.1f}, shards at " + ", ".join(f"{t:.1f}" for t in written)
    assert span > 10, f"the batches took {span:.1f}s: too quick to tell streaming from writing at the end"
    assert written[0] - ends[0] < 30, when  # the first shard within 30 s of the first batch's end
    assert written[0] < ends[-1] - span / 2, when  # long before the last batch: a kill then loses only the rest


def test_scale_bench_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scale benchmark at toy sizes: every case runs, is timed, and the runs did the right work."""
    from qwenbatch.bench.scale import markdown, run_scale_bench

    ray_dir = tempfile.mkdtemp(prefix="qb-ray-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_dir)  # the benchmark's own Ray runs, not the session's
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        results = run_scale_bench(tmp_path, rows=0, done=(300,), manifest_rows=500, shard_rows=100, new_rows=20)
    finally:
        wait_for_exit(ray_dir, time.monotonic() + 30)
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert [m.case for m in results] == [
        "qwenbatch run over 0 done rows",
        "`qwenbatch run`, complete, 20 rows",
        "`qwenbatch status`, running",
        "`qwenbatch report`",
        "qwenbatch run over 300 done rows",
        "`qwenbatch run`, complete, 320 rows",
        "opening a manifest (id checks)",
    ]
    assert all(m.wall_s > 0 and m.cpu_s > 0 and m.driver_peak_rss > 0 and m.exit_code == 0 for m in results)
    for run_case in (results[0], results[4]):
        assert run_case.rows == 20 and run_case.shards_written >= 1 and 0 < run_case.first_shard_s < run_case.wall_s
    for complete in (results[1], results[5]):  # nothing left: skipped, nothing written
        assert complete.rows == 0 and complete.shards_written == 0 and complete.first_shard_s is None
    assert "already complete" in (tmp_path / "logs" / "complete-300.log").read_text()
    out = read_output(tmp_path / "done-300" / "out")
    assert len(out) == len(set(out.column("id").to_pylist())) == 320  # the synthetic rows and the new ones
    assert len(list((tmp_path / "done-300" / "out").glob("part-*.parquet"))) == 3 + results[4].shards_written
    table = (tmp_path / "scale.md").read_text()
    assert table == markdown(results) and "| qwenbatch run over 300 done rows | 20 |" in table
    assert "resume, against a run over 0 done rows: over 300 done rows" in table
