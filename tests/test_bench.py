"""The benchmark: its GPU model has the 8B shape, and a small CPU run produces its tables."""

from __future__ import annotations

import importlib.util
import json

import pytest

from qwenbatch.bench import QWEN3_VL_8B_PARAMS, count_parameters, qwen3_vl_8b_config, run_bench


def test_gpu_model_has_the_8b_shape():
    """Built on the meta device: the exact parameter count, no memory."""
    config = qwen3_vl_8b_config({"image_token_id": 267})
    assert abs(count_parameters(config) - QWEN3_VL_8B_PARAMS) / QWEN3_VL_8B_PARAMS < 0.001
    assert config.text_config.num_hidden_layers == 36 and config.vision_config.depth == 27
    assert config.image_token_id == 267


def test_cpu_bench_smoke(ray_local, tmp_path):
    results = run_bench("cpu", tmp_path, images=8)
    names = [row["name"] for row in results["end_to_end"]]
    engine = ["qwenbatch, engine vllm"] if importlib.util.find_spec("vllm") else []  # beside, where vLLM is installed
    assert names == ["plain transformers loop (batch 4)", "qwenbatch", "qwenbatch (jpeg_draft)", *engine]
    assert results["notes"] == ([] if engine else ["qwenbatch, engine vllm: skipped, vLLM is not installed here "
                                                   "(docs/vllm.md)"])  # fmt: skip
    for row in results["end_to_end"]:
        assert row["images"] == 8 and row["seconds"] > 0 and row["peak_memory_bytes"] > 0
        assert row["output_tokens"] == 8 * results["settings"]["max_new_tokens"]  # fixed output length
        assert 0 < row["first_output_s"] <= row["seconds"] and 0 < row["first_output_rows"] <= 8
    assert [row["task"] for row in results["tasks"]] == ["caption", "vqa", "document"]
    assert len(results["load_stage"]) == 3 and results["load_stage"][0]["ratio"] == 1.0
    assert results["ratio"] > 0
    assert json.loads((tmp_path / "bench.json").read_text())["mode"] == "cpu"
    table = (tmp_path / "bench.md").read_text()
    assert "| plain transformers loop (batch 4) | 8 |" in table and "| document | 4 |" in table
    assert "| first output (s) | images/s after it |" in table


def test_sim_bench_smoke(ray_local, tmp_path):
    """The real pipeline on the simulated H100: ideal and achieved rates, GPU busy time, CPU per image; each
    decode step takes at least the host time given for it, eager or compiled."""
    results = run_bench("sim", tmp_path, images=10, host_ms=(12.5, 1.0))
    names = [row["name"] for row in results["end_to_end"]]
    assert names == ["1024x768 JPEGs, eager", "1024x768 JPEGs, compiled", "4000x3000 JPEGs, compiled",
                     "4000x3000 JPEGs, jpeg_draft, compiled"]  # fmt: skip
    assert [row["images"] for row in results["end_to_end"]] == [10, 10, 4, 4]
    for row in results["end_to_end"]:
        assert row["output_tokens"] == row["images"] * 128  # the stand-in's fixed answers, full length
        # The busy window runs from the first generate to the last: a single batch fills it exactly.
        assert row["ideal_images_per_s"] >= row["busy_window_images_per_s"] > 0
        assert 0 < row["gpu_busy"] <= 1 and row["cpu_s_per_image"] > 0
    eager, compiled = results["end_to_end"][:2]
    # 128 steps of 12.5 ms against the roofline's ~6 ms: eager's simulated GPU time is the longer by far.
    assert eager["ideal_images_per_s"] < compiled["ideal_images_per_s"]
    assert results["host_ms_per_step"] == {"eager": 12.5, "compiled": 1.0, "source": "given with --host-ms"}
    table = (tmp_path / "bench.md").read_text()
    assert "| run | images | seconds | ideal images/s | achieved images/s | in the busy window | gpu_busy |" in table
    assert "at least the host's time to issue it: 12.5 ms eager, 1.0 ms compiled" in table


def test_simulated_decode_steps_take_the_host_time_where_it_is_longer():
    from qwenbatch.bench.cost import BatchShape, h100_seconds

    shape = BatchShape(rows=32, prompt_tokens=790, image_patches=(3072,) * 32, new_tokens=128)
    roofline = h100_seconds(shape)
    assert h100_seconds(shape, host_step_s=1e-3) == roofline  # shorter than every step's memory time
    slow = h100_seconds(shape, host_step_s=0.05)
    assert slow > roofline and slow - h100_seconds(BatchShape(32, 790, (3072,) * 32, 0)) == pytest.approx(128 * 0.05)


def test_host_bench_times_a_decode_step_eager_and_compiled(tmp_path):
    """The real generate loop of tiny-width models of two depths, eager and compiled (on CPU: inductor)."""
    results = run_bench("host", tmp_path, layers=(1, 3))
    rows = results["host"]
    assert [(row["device"], row["layers"]) for row in rows] == [("cpu", 1), ("cpu", 3)]
    for row in rows:
        assert row["eager_ms_per_step"] > 0 and row["compiled_ms_per_step"] > 0 and row["compiled_first_call_s"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert "| device | text layers | eager ms/step | compiled ms/step |" in table and "| cpu | 3 |" in table
    assert "- cpu: per text layer per step, eager " in table
    assert json.loads((tmp_path / "bench.json").read_text())["mode"] == "host"


def test_tiny_model_depth_is_set_in_memory():
    from qwenbatch.tiny import tiny_in_memory

    model, processor = tiny_in_memory(text_layers=36)
    assert len(model.model.language_model.layers) == 36 and model.config.text_config.hidden_size == 32
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id


def test_cpu_seconds_between_two_moments_and_the_cores_for_95_percent():
    from qwenbatch.bench import cores_for
    from qwenbatch.bench.measure import CpuSeconds

    cpu = CpuSeconds()
    cpu.samples = [(100.0, 10.0), (101.0, 12.0), (102.0, 13.0), (104.0, 17.0)]  # 2, 1, then 2 cores busy
    assert cpu.seconds == 7.0
    assert cpu.between(100.5, 103.0) == 1.0 + 1.0 + 2.0  # interpolated within each interval
    assert cpu.between(90.0, 200.0) == 7.0  # clipped to what was sampled
    assert cores_for({"window_cores": 1.9, "gpu_busy": 0.76}) == 1.9 * 0.95 / 0.76
    assert cores_for({"window_cores": None, "gpu_busy": 0.5}) is None
