"""Scale benchmark: the job's own machinery at many rows, where the model costs almost nothing.

The tiny model, 32x32 images at a 4-token pixel budget and 1 new token: what is left is the pipeline
(reading, skipping done rows, batching, tasks, writing) and the commands that read an output. Each
case runs in a fresh process, as a user runs it (`qwenbatch run`, `status`, `report`), and its process
tree is sampled for wall time, CPU seconds and peak RSS (the process alone, and with its Ray workers;
shared pages count once per process).

Cases:
- the plain loop (PIL, processor, `generate`, 4 images at a time, one process) and `qwenbatch run` over
  the same rows: orchestration = qwenbatch's CPU seconds minus the plain loop's, per row;
- 1,000 new rows into an empty output, and 1,000 new rows over 1M / 5M / 10M done rows; then the same
  command again, which finds nothing left (the manifest's ids against the output's index) and skips;
- `qwenbatch status` and `qwenbatch report` over those outputs (status: still running, no summary);
- the id checks of a large manifest (`open_manifest`).

Done rows are synthetic: shards written directly in the output format by the job's own shard writer,
so a 10M-row output takes minutes to build instead of a day of captioning.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qwenbatch import schema

log = logging.getLogger(__name__)

ROWS = 20_000  # the orchestration case
NEW_ROWS = 1_000  # the resume cases: rows a run adds over the done ones
DONE_ROWS = (1_000_000, 5_000_000, 10_000_000)
MANIFEST_ROWS = 10_000_000  # the id-check case
SHARD_ROWS = 10_000  # synthetic done shards: a time-capped shard of a slow run, not the largest a shard gets
MANIFEST_FILE_ROWS = 1_000_000
IMAGE_SIZE = (32, 32)
DISTINCT_IMAGES = 64
MIN_PIXELS = 4 * schema.PIXELS_PER_TOKEN  # 64x64: 4 visual tokens
PLAIN_BATCH = 4
SAMPLE_S = 0.2


@dataclass
class Measure:
    case: str
    rows: int | None
    wall_s: float
    cpu_s: float
    driver_peak_rss: int
    all_peak_rss: int
    first_shard_s: float | None = None
    shards_written: int | None = None
    exit_code: int = 0


def _tree(root: Any) -> list[Any]:
    import psutil

    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


class Lock:
    """An exclusive `flock` on a file for the span of one timed case, when a machine is shared."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.handle: Any = None

    def __enter__(self) -> Lock:
        if self.path is not None:
            import fcntl

            self.handle = open(self.path, "a")  # noqa: SIM115 - held until __exit__
            fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the file releases the lock
            self.handle = None


def measure(
    case: str,
    command: list[str],
    rows: int | None,
    log_path: Path,
    output: Path | None = None,
    lock: Lock | None = None,
) -> Measure:
    """Run a command in a fresh process; sample its process tree until it exits."""
    with lock or Lock(None):
        return _measure(case, command, rows, log_path, output)


def _measure(case: str, command: list[str], rows: int | None, log_path: Path, output: Path | None) -> Measure:
    import psutil

    shards_before = set(output.glob("part-*.parquet")) if output and output.exists() else set()
    started = time.time()
    with open(log_path, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    root = psutil.Process(process.pid)
    cpu: dict[int, float] = {}
    driver_peak = all_peak = 0
    while process.poll() is None:
        total = 0
        for proc in _tree(root):
            try:
                with proc.oneshot():
                    times, rss = proc.cpu_times(), proc.memory_info().rss
            except psutil.Error:
                continue
            cpu[proc.pid] = times.user + times.system
            total += rss
            if proc.pid == root.pid:
                driver_peak = max(driver_peak, rss)
        all_peak = max(all_peak, total)
        time.sleep(SAMPLE_S)
    wall = time.time() - started
    first = written = None
    if output is not None and output.exists():
        new = [p for p in output.glob("part-*.parquet") if p not in shards_before]
        written = len(new)
        first = min(p.stat().st_mtime for p in new) - started if new else None
    result = Measure(case, rows, wall, sum(cpu.values()), driver_peak, all_peak, first, written, process.returncode)
    log.info("%s", result)
    if process.returncode not in (0, 1):
        raise RuntimeError(f"{case} failed (exit {process.returncode}); see {log_path}")
    return result


# --- data -----------------------------------------------------------------------------------------


def make_images(folder: Path) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    paths = []
    for index in range(DISTINCT_IMAGES):
        path = folder / f"t{index:03d}.png"
        if not path.exists():
            Image.new("RGB", IMAGE_SIZE, tuple(rng.randrange(256) for _ in range(3))).save(path)
        paths.append(str(path))
    return paths


def ids_for(prefix: str, numbers: Any) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(prefix, pc.utf8_lpad(pa.array(numbers).cast(pa.string()), 9, "0"), "")


def write_manifest(path: Path, prefix: str, rows: int, images: list[str], start: int = 0) -> Path:
    """`rows` ids `{prefix}{n:09d}`, each pointing to one of the tiny images."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    numbers = np.arange(start, start + rows)
    table = pa.table({"id": ids_for(prefix, numbers), "image": pa.array(images).take(numbers % len(images))})
    pq.write_table(table, path)
    return path


def job_config(path: Path, model: str, manifest: Path, output: Path, images: Path) -> Path:
    data = {
        "model": {"name": model, "dtype": "float32"},
        "generation": {"max_new_tokens": 1},
        "image": {"min_pixels": MIN_PIXELS, "allowed_prefixes": [str(images)]},
        "input": {"path": str(manifest)},
        "output": {"path": str(output)},
        "run": {"device": "cpu"},
    }
    path.write_text(json.dumps(data))
    return path


def synthetic_rows(prefix: str, numbers: Any, images: list[str], run_id: str) -> Any:
    """Output rows as the job writes them: 97% ok, 2% load_error, 1% infer_error."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from qwenbatch.write import finalize_batch

    draw = numbers % 100
    ok = draw < 97
    mask = pa.array(ok)
    status = np.where(ok, schema.OK, np.where(draw < 99, schema.LOAD_ERROR, schema.INFER_ERROR))
    number_text = pa.array(numbers).cast(pa.string())
    error = pc.if_else(
        pa.array(status == schema.LOAD_ERROR),
        pc.binary_join_element_wise("file not found: /data/incoming/", number_text, ""),
        pa.scalar("CUDA out of memory. Tried to allocate 20.00 GiB"),
    )
    table = pa.table(
        {
            "id": ids_for(prefix, numbers),
            "image": pa.array(images).take(numbers % len(images)),
            schema.TEXT: pc.if_else(mask, pc.binary_join_element_wise("a synthetic caption ", number_text, ""), None),
            schema.STATUS: pa.array(status),
            schema.ERROR: pc.if_else(mask, None, error),
            schema.WIDTH: pc.if_else(mask, pa.scalar(64, pa.int32()), None),
            schema.HEIGHT: pc.if_else(mask, pa.scalar(64, pa.int32()), None),
            schema.IMAGE_TOKENS: pc.if_else(mask, pa.scalar(4, pa.int32()), None),
            schema.INPUT_TOKENS: pc.if_else(mask, pa.scalar(65, pa.int32()), None),
            schema.OUTPUT_TOKENS: pc.if_else(mask, pa.array(1 + numbers % 7, pa.int32()), None),
            schema.FINISH_REASON: pc.if_else(mask, schema.FINISH_LENGTH, None),
        }
    )
    return finalize_batch(table, model="tiny", task="caption", run_id=run_id)


def synthetic_output(folder: Path, rows: int, images: list[str], shard_rows: int = SHARD_ROWS) -> Path:
    """`rows` done rows (ids `d000000000`...) in shards of `shard_rows`, written by the job's shard writer."""
    import numpy as np

    from qwenbatch import storage
    from qwenbatch.shards import write_shard

    marker = folder / "_synthetic.json"
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    fs, base = storage.resolve(str(folder))
    for start in range(0, rows, shard_rows):
        numbers = np.arange(start, min(rows, start + shard_rows))
        write_shard(fs, base, synthetic_rows("d", numbers, images, "synthetic"), "id")
    marker.write_text(json.dumps({"rows": rows, "files": sorted(p.name for p in folder.glob("part-*.parquet"))}))
    return folder


def reset_output(folder: Path) -> None:
    """Back to the synthetic rows alone: what a run added goes, so every case starts from the same output."""
    import shutil

    keep = set(json.loads((folder / "_synthetic.json").read_text())["files"])
    for path in folder.iterdir():
        if (
            path.name.startswith("part-")
            and path.name not in keep
            or path.name in (schema.SUMMARY_FILE, schema.SUCCESS_FILE)
        ):
            path.unlink()
    index = folder / schema.INDEX_DIR
    if index.exists():
        for path in index.iterdir():
            if path.name not in keep:
                path.unlink() if path.is_file() else shutil.rmtree(path)


# --- the cases ------------------------------------------------------------------------------------


def plain_loop(model: str, manifest: str) -> None:
    """The tutorial loop over the manifest, in this process: PIL, processor and generate, 4 at a time."""
    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    paths = pq.read_table(manifest, columns=["image"]).column("image").to_pylist()
    processor = AutoProcessor.from_pretrained(model)
    processor.tokenizer.padding_side = "left"
    loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32).eval()
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": schema.DEFAULT_PROMPTS["caption"]}]}
    ]
    chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": schema.DEFAULT_MAX_PIXELS}
    for start in range(0, len(paths), PLAIN_BATCH):
        images = [Image.open(p).convert("RGB") for p in paths[start : start + PLAIN_BATCH]]
        inputs = processor(text=[chat] * len(images), images=images, return_tensors="pt", padding=True, size=size)
        with torch.inference_mode():
            loaded.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False)


def python(code: str, module: str = __name__) -> list[str]:
    return [sys.executable, "-c", f"import {module}; import qwenbatch; {code}"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "qwenbatch.cli", *args]


def expect_run(output: Path, processed: int, done: int) -> None:
    """A timed run must also be a right one: it captioned every new row (the model ran on each: a row
    that failed to load would cost nothing), and skipped the done ones."""
    summary = json.loads((output / schema.SUMMARY_FILE).read_text())
    this_run = summary["this_run"]
    got = (summary["state"], this_run["rows"], this_run["status"], summary["skipped_done"])
    if got != ("succeeded", processed, {schema.OK: processed}, done):
        raise RuntimeError(f"{output}: expected a run of {processed} rows over {done} done, got {got}")


class Bench:
    """The cases, in a folder that keeps their data between invocations (a 10M-row output takes minutes)."""

    def __init__(self, folder: Path, lock: Path | None) -> None:
        from qwenbatch.tiny import build_tiny_model

        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.model = str(build_tiny_model(folder / "tiny-model"))
        self.images = make_images(folder / "images")
        self.logs = folder / "logs"
        self.logs.mkdir(exist_ok=True)
        self.lock = Lock(lock)
        self.results: list[Measure] = []

    def timed(self, case: str, command: list[str], rows: int, name: str, output: Path | None = None) -> None:
        self.results.append(measure(case, command, rows, self.logs / f"{name}.log", output, self.lock))
        (self.folder / "scale.json").write_text(json.dumps([asdict(m) for m in self.results], indent=2))

    def work(self, rows: int) -> None:
        """The plain loop and `qwenbatch run` over the same rows, into an empty output."""
        import shutil

        work = write_manifest(self.folder / "work" / f"manifest-{rows}.parquet", "w", rows, self.images)
        self.timed("plain loop", python(f"{__name__}.plain_loop({self.model!r}, {str(work)!r})"), rows, "plain")
        out = self.folder / "work" / "out"
        shutil.rmtree(out, ignore_errors=True)
        job = job_config(self.folder / "work" / "job.yaml", self.model, work, out, self.folder / "images")
        self.timed("qwenbatch run", cli("run", str(job)), rows, "run", out)
        expect_run(out, rows, 0)

    def over_done(self, done: int, new_rows: int, shard_rows: int) -> None:
        """`status` and `report` over `done` synthetic rows, then a run that adds `new_rows` to them."""
        case = self.folder / f"done-{done}"
        for start in range(0, done, MANIFEST_FILE_ROWS):
            name = f"done-{start // MANIFEST_FILE_ROWS:04d}.parquet"
            write_manifest(case / "manifests" / name, "d", min(MANIFEST_FILE_ROWS, done - start), self.images, start)
        write_manifest(case / "manifests" / f"new-{new_rows}.parquet", "n", new_rows, self.images)
        for other in (case / "manifests").glob("new-*.parquet"):
            if other.name != f"new-{new_rows}.parquet":
                other.unlink()
        out = synthetic_output(case / "out", done, self.images, shard_rows)
        reset_output(out)
        if done:
            self.timed("`qwenbatch status`, running", cli("status", str(out)), done, f"status-{done}")
            report = str(case / "report.html")
            self.timed("`qwenbatch report`", cli("report", str(out), "--out", report), done, f"report-{done}")
        job = job_config(case / "job.yaml", self.model, case / "manifests", out, self.folder / "images")
        self.timed(f"qwenbatch run over {done:,} done rows", cli("run", str(job)), new_rows, f"run-{done}", out)
        expect_run(out, new_rows, done)
        # The same command again: the manifest's ids against the output's index, no Ray ("already complete").
        complete = f"`qwenbatch run`, complete, {done + new_rows:,} rows"
        self.timed(complete, cli("run", str(job)), 0, f"complete-{done}", out)

    def manifest(self, rows: int) -> None:
        """`open_manifest` (the id checks) over `rows` rows in files of a million."""
        big = self.folder / f"manifest-{rows}"
        for start in range(0, rows, MANIFEST_FILE_ROWS):
            name = f"m-{start // MANIFEST_FILE_ROWS:04d}.parquet"
            write_manifest(big / name, "m", min(MANIFEST_FILE_ROWS, rows - start), self.images, start)
        code = f"from qwenbatch.config import InputConfig; qwenbatch.read.open_manifest(InputConfig(path={str(big)!r}))"
        self.timed("opening a manifest (id checks)", python(code, "qwenbatch.read"), rows, "manifest")


def run_scale_bench(
    folder: Path,
    rows: int = ROWS,
    done: tuple[int, ...] = DONE_ROWS,
    manifest_rows: int = MANIFEST_ROWS,
    shard_rows: int = SHARD_ROWS,
    new_rows: int = NEW_ROWS,
    lock: Path | None = None,
) -> list[Measure]:
    """Every case in turn (data is built outside the lock); writes scale.json and scale.md into `folder`."""
    bench = Bench(folder, lock)
    if rows:
        bench.work(rows)
    for done_rows in (0, *done) if done else ():  # a run into an empty output is what the others compare with
        bench.over_done(done_rows, new_rows, shard_rows)
    if manifest_rows:
        bench.manifest(manifest_rows)
    (folder / "scale.md").write_text(markdown(bench.results))
    return bench.results


def bench_from_args(folder: Path, args: Any) -> int:
    """`qwenbatch bench --mode scale`: --images, --done, --manifest-rows and --lock, or the defaults."""
    done = tuple(int(n) for n in args.done.split(",") if n) if args.done is not None else DONE_ROWS
    rows = args.images if args.images is not None else ROWS
    manifest_rows = args.manifest_rows if args.manifest_rows is not None else MANIFEST_ROWS
    measured = run_scale_bench(folder, rows, done, manifest_rows, lock=args.lock)
    print(markdown(measured))
    print(f"written: {folder / 'scale.json'} and {folder / 'scale.md'}")
    return 0


def markdown(results: list[Measure]) -> str:
    gib = 2**30
    lines = [
        f"## qwenbatch scale benchmark (CPU, {os.cpu_count()} cores)",
        "",
        "| case | rows | wall (s) | CPU (s) | first shard (s) | shards | driver / all peak RSS (GiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in results:
        first = "-" if m.first_shard_s is None else f"{m.first_shard_s:.1f}"
        shards = "-" if m.shards_written is None else str(m.shards_written)
        lines.append(
            f"| {m.case} | {m.rows if m.rows is not None else '-':,} | {m.wall_s:.1f} | {m.cpu_s:.1f} | {first} | "
            f"{shards} | {m.driver_peak_rss / gib:.2f} / {m.all_peak_rss / gib:.2f} |"
        )
    plain = next((m for m in results if m.case == "plain loop"), None)
    ours = next((m for m in results if m.case == "qwenbatch run"), None)
    if plain and ours and ours.rows:
        lines += [
            "",
            f"orchestration per row: {1000 * (ours.cpu_s - plain.cpu_s) / ours.rows:.2f} ms of CPU, "
            f"{1000 * (ours.wall_s - plain.wall_s) / ours.rows:.2f} ms of wall time beyond the plain loop",
        ]
    runs = [m for m in results if m.case.startswith("qwenbatch run over")]
    if len(runs) > 1:
        base = runs[0]
        ratios = ", ".join(f"{m.case.removeprefix('qwenbatch run ')} {m.wall_s / base.wall_s:.2f}x" for m in runs[1:])
        lines += ["", f"resume, against a run {base.case.removeprefix('qwenbatch run ')}: {ratios} the wall time"]
    return "\n".join(lines) + "\n"
