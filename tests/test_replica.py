"""The replica never waits on the CPU: batch k+1 is prepared while batch k generates; busy time is measured.

The model is the benchmark's simulated GPU (a real processor and tokenizer, `generate` sleeping for a
batch's H100 time, stretched here to about a second), so what is checked is the order of real events.
"""

from __future__ import annotations

import functools
import threading
import time

import pyarrow as pa
import pytest

from qwenbatch import schema
from qwenbatch.bench.sim import load_simulated
from qwenbatch.config import GenerationConfig, ModelConfig
from qwenbatch.infer import Generator
from qwenbatch.timing import ReplicaClock, ReplicaTime, TimingSink, busy_summary, concurrent_replicas
from tests.helpers import noise_image

SLOWDOWN = 25.0  # a tiny batch's H100 time (about 40 ms) stretched to about a second


def block(generator: Generator, count: int, seed: int = 0) -> pa.Table:
    """Rows as the load and prompt stages hand them over; sizes vary so batches differ."""
    from qwenbatch.config import TaskConfig
    from qwenbatch.prompt import chat_messages

    chat = generator.processor.apply_chat_template(
        chat_messages(TaskConfig(kind="caption"), "Describe."), tokenize=False, add_generation_prompt=True
    )
    sizes = [(64 + 32 * (i % 3), 64) for i in range(count)]
    return pa.table(
        {
            "id": [f"s{seed}-{i}" for i in range(count)],
            schema.PIXELS: pa.array([noise_image(w, h, seed + i).tobytes() for i, (w, h) in enumerate(sizes)]),
            schema.WIDTH: pa.array([w for w, _ in sizes], pa.int32()),
            schema.HEIGHT: pa.array([h for _, h in sizes], pa.int32()),
            schema.IMAGE_TOKENS: pa.array([w * h // 1024 for w, h in sizes], pa.int32()),
            schema.STATUS: [schema.OK] * count,
            schema.ERROR: pa.array([None] * count, pa.string()),
            schema.CHAT: [chat] * count,
        }
    )


@pytest.fixture(autouse=True)
def one_torch_thread():
    """As in a GPU replica (Ray starts it with OMP_NUM_THREADS=1); several OpenMP threads on a busy
    machine stall for seconds at their barriers, which is not what these tests are about."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def simulated_generator(tiny_model, timing: TimingSink | None = None) -> Generator:
    return Generator(
        ModelConfig(name=str(tiny_model)),
        GenerationConfig(max_new_tokens=8, min_new_tokens=8),
        32 * 32 * 4,
        32 * 32 * 64,
        device="cpu",
        batch_size=2,
        timing=timing,
        load=functools.partial(load_simulated, slowdown=SLOWDOWN),
    )


def record(generator: Generator) -> tuple[list, list]:
    """Wrap the real prepare and generate to log (start, end, input_ids, thread) of each call."""
    prepared, generated = [], []
    real_prepare, real_generate = generator.prepare, generator.model.generate

    @functools.wraps(real_prepare)
    def prepare(*args, **kwargs):
        started = time.perf_counter()
        result = real_prepare(*args, **kwargs)
        prepared.append((started, time.perf_counter(), result.inputs["input_ids"], threading.current_thread().name))
        return result

    @functools.wraps(real_generate)
    def generate(*args, **kwargs):
        started = time.perf_counter()
        result = real_generate(*args, **kwargs)
        generated.append((started, time.perf_counter(), kwargs["input_ids"], threading.current_thread().name))
        return result

    generator.prepare, generator.model.generate = prepare, generate
    return prepared, generated


def assert_never_waited(prepared: list, generated: list) -> None:
    """Every generate call after the first ran a batch that was ready before the call before it ended."""
    generated = sorted(generated, key=lambda call: call[0])
    assert len(generated) == len(prepared) >= 3
    for before, call in zip(generated, generated[1:], strict=False):
        ready = next(end for _, end, ids, _ in prepared if ids is call[2])
        timeline = [(round(s, 3), round(e, 3), id(i) % 1000, t) for s, e, i, t in sorted(prepared + generated)]
        assert ready <= before[1], f"a batch was prepared only after the model had finished the one before: {timeline}"
    assert all(thread.startswith("prepare") for *_, thread in prepared)
    assert not any(thread.startswith("prepare") for *_, thread in generated)


def test_next_batch_is_prepared_while_one_generates(tiny_model, tmp_path):
    timing = TimingSink.for_run(str(tmp_path / "out"), "run-1")
    generator = simulated_generator(tiny_model, timing)
    prepared, generated = record(generator)
    out = generator(block(generator, 6))
    assert out.column(schema.STATUS).to_pylist() == [schema.OK] * 6
    assert out.column(schema.OUTPUT_TOKENS).to_pylist() == [8] * 6
    assert_never_waited(prepared, generated)

    figures = generator.clock.figures
    assert (figures.calls, figures.batches, figures.rows) == (1, 3, 6)
    assert figures.generate_s >= generator.model.seconds * 0.99  # the sleeps are inside generate
    assert figures.prepare_s > 0 and figures.wait_s == 0
    assert figures.span_s >= figures.generate_s
    assert figures.first_block < figures.started and figures.fill_s > 0  # the first batch prepared, then generated
    [published] = timing.read()
    assert published.replica == figures.replica and published.batches == 3 and published.device == "cpu"


def test_two_blocks_at_once_keep_the_model_busy(tiny_model):
    """Ray Data hands a replica two blocks at once: the second's batches are prepared during the first's."""
    generator = simulated_generator(tiny_model)
    prepared, generated = record(generator)
    outputs = {}
    threads = [
        threading.Thread(target=lambda seed=seed: outputs.setdefault(seed, generator(block(generator, 4, seed))))
        for seed in (0, 100)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed, out in outputs.items():
        assert out.column("id").to_pylist() == [f"s{seed}-{i}" for i in range(4)]
        assert out.column(schema.STATUS).to_pylist() == [schema.OK] * 4
    assert_never_waited(prepared, generated)
    intervals = sorted((start, end) for start, end, *_ in generated)
    assert all(end <= start for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False)), (
        "two generate calls overlapped on one model"
    )
    assert generator.clock.figures.calls == 2 and generator.clock.figures.batches == 4


def test_waiting_for_rows_counts_only_time_with_no_block_in_hand():
    clock = ReplicaClock.start("cuda")
    clock.call_started(4)
    clock.call_started(4)  # a second block arrives while the first is still in hand
    clock.call_ended()
    time.sleep(1.0)  # one block still in hand: not waiting
    clock.call_ended()
    time.sleep(0.3)  # nothing in hand: waiting for rows
    clock.call_started(4)
    figures = clock.call_ended()
    assert 0.3 <= figures.wait_s < 1.0
    assert figures.calls == 3 and figures.rows == 12


def replica(name: str, started: float, ended: float, generate_s: float) -> ReplicaTime:
    return ReplicaTime(name, "host", 1, "cuda", started=started, ended=ended, generate_s=generate_s, batches=1)


def test_gpu_busy_is_generate_time_over_replicas_times_the_window():
    # Two replicas from 100 s to 200 s; the second died at 150 s and Ray restarted it at 152 s.
    replicas = [
        replica("a", 100, 200, 90),
        replica("b", 100, 150, 45),
        replica("b2", 152, 200, 40),
        ReplicaTime("idle", "host", 2, "cuda"),  # started, never got a batch
    ]
    assert concurrent_replicas(replicas) == 2
    summary = busy_summary(replicas)
    assert summary["gpu_busy"] == round((90 + 45 + 40) / (2 * 100), 4)
    figures = summary["replicas"]
    assert (figures["count"], figures["window_s"], figures["generate_s"]) == (2, 100, 175)
    assert [r["replica"] for r in figures["each"]] == ["idle", "a", "b", "b2"]
    assert figures["each"][1]["busy"] == 0.9
    assert busy_summary([])["gpu_busy"] is None


def test_a_run_reports_its_replicas_busy_time(tiny_model, ray_local, tmp_path, capsys):
    """The summary, `qwenbatch status` and, for a run that died, the figures its replicas left behind."""
    from qwenbatch.cli import main
    from qwenbatch.pipeline import run
    from tests.helpers import job_config, write_images, write_manifest

    images = write_images(tmp_path / "images", 12, sizes=[(64, 48), (96, 64)])
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i}", "image": str(p)} for i, p in enumerate(images)])
    output = tmp_path / "out"
    result = run(job_config(tiny_model, manifest, output))
    assert result.succeeded
    summary = result.summary
    assert 0 < summary["gpu_busy"] <= 1
    figures = summary["replicas"]
    assert figures["count"] == 1 and len(figures["each"]) == 1
    [one] = figures["each"]
    assert one["rows"] == 12 and one["batches"] >= 3 and one["device"] == "cpu"  # batch_size 4
    assert 0 < one["generate_s"] <= one["span_s"] and one["prepare_s"] > 0
    assert summary["gpu_busy"] == pytest.approx(one["generate_s"] / one["span_s"], abs=0.01)  # both rounded
    assert not (output / schema.REPLICAS_FOLDER).exists()  # folded into the summary

    assert main(["status", str(output)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "busy" in line)  # on the CPU: no GPU
    assert line.startswith(f"replica busy {summary['gpu_busy']:.1%} over 1 replica: generate ")

    # A run killed mid-way leaves shards, no summary, and its replicas' last figures: status shows those.
    (output / schema.SUMMARY_FILE).unlink()
    (output / schema.SUCCESS_FILE).unlink()
    died = ReplicaTime("node-7-abc", "node", 7, "cuda", started=100.0, ended=160.0, batches=9, rows=72,
                       generate_s=54.0, prepare_s=20.0, wait_s=1.5)  # fmt: skip
    TimingSink.for_run(str(output), "20261202T000000Z-dead01").publish(died)
    assert main(["status", str(output)]) == 0
    table = capsys.readouterr().out
    assert "state      running" in table
    assert "gpu busy   90.0% over 1 replica: generate 54.0 s, preparing 20.0 s (overlapped), " in table

    # The rerun finishes the output and clears the dead run's figures with its own.
    assert run(job_config(tiny_model, manifest, output)).summary["this_run"]["rows"] == 0
    assert not (output / schema.REPLICAS_FOLDER).exists()


def test_prepared_inputs_are_the_processors_own(tiny_model):
    """uint8 patches normalised after the copy: bit for bit what the processor's default call returns."""
    import torch

    generator = simulated_generator(tiny_model)
    sizes = [(64, 64), (160, 96), (224, 96), (1024, 768), (64, 2048)]
    rng = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=rng) for w, h in sizes]
    chats = [f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Row {i}.<|im_end|>\n" for i in range(5)]
    prepared = generator.prepare(chats, images)
    expected = generator.processor(text=chats, images=images, return_tensors="pt", padding=True, size=generator.size)
    assert prepared.inputs["pixel_values"].dtype == torch.float32
    for name, tensor in expected.items():
        assert torch.equal(prepared.inputs[name], tensor), name
    assert prepared.input_tokens == expected["attention_mask"].sum(dim=1).tolist()
