"""Benchmark: qwenbatch against the plain transformers loop, same images, model and output length.

The plain loop is what tutorials show: in one process, open each image with PIL, run the
processor and `generate` on 4 images at a time. qwenbatch runs its real pipeline on Ray.
Output length is fixed (`min_new_tokens == max_new_tokens`) so both do the same work.

Modes:
- cpu: the tiny model, mixed image sizes including large 4000x3000 JPEGs; plus a load-stage
  benchmark (fetch + decode + resize alone against PIL open/convert + the processor).
- gpu: a random-weight model with the exact Qwen3-VL-8B-Instruct shape, bf16, 1024x768 images,
  the caption task, 128 new tokens: the plain loop on 64 images, qwenbatch on 384, and qwenbatch
  with `generation.compile`; sized to fit `jobs/gpu_check.sh` (docs/performance.md shows the arithmetic).
- sim: the real pipeline with the model replaced by a simulated H100 (`bench.sim`): does the CPU
  side keep the GPU busy? 1024x768 JPEGs with eager and with compiled decoding (each decode step takes
  at least the host time `host` measures for it), then 4000x3000 phone JPEGs without and with
  `jpeg_draft`, compiled (a CUDA replica's default).
- host: the host time of one decode step of transformers' `generate` loop, Qwen3-VL at the tiny width
  with 2 and 36 (the 8B's) text layers, eager and compiled (`bench.host`); on CPU, and on CUDA too where
  there is a GPU.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from qwenbatch import schema
from qwenbatch.bench.contenders import (
    PLAIN_BATCH,
    Mode,
    load_stage,
    pipeline_config,
    plain_loop,
    qwenbatch_run,
    task_table,
    vllm_run,
)
from qwenbatch.bench.cost import H100_FREE_AFTER_LOAD, KV_BYTES_PER_TOKEN, TEXT_LAYERS
from qwenbatch.bench.host import HOST_DEVICES, HOST_LAYERS, host_markdown
from qwenbatch.bench.images import make_bench_images
from qwenbatch.bench.measure import Measure, machine
from qwenbatch.bench.shape import QWEN3_VL_8B_PARAMS, build_random_8b, count_parameters, qwen3_vl_8b_config
from qwenbatch.ray_start import init_ray
from qwenbatch.status import occupancy_text

__all__ = ["QWEN3_VL_8B_PARAMS", "count_parameters", "markdown", "qwen3_vl_8b_config", "run_bench"]

log = logging.getLogger(__name__)

LOAD_STAGE_IMAGES = 75  # 4000x3000 JPEGs timed in the load-stage table: a steady figure in seconds

# CPU: enough images that the pipeline's fixed start (Ray workers importing torch, about 9 s on
# 2 cores) is not most of the run, as it is not in a real batch job; `first output` shows it apart.
CPU = Mode("cpu", images=1000, max_new_tokens=16, max_pixels=schema.DEFAULT_MAX_PIXELS, batch_size=32,
           dtype="float32", device="cpu")  # fmt: skip
GPU = Mode("gpu", images=384, max_new_tokens=128, max_pixels=schema.DEFAULT_MAX_PIXELS, batch_size=32,
           dtype="bfloat16", device="cuda", plain_images=64)  # fmt: skip
SIM = Mode("sim", images=640, max_new_tokens=128, max_pixels=schema.DEFAULT_MAX_PIXELS, batch_size=32,
           dtype="bfloat16", device="cuda", plain_images=0)  # fmt: skip
HOST = Mode("host", images=0, max_new_tokens=0, max_pixels=0, batch_size=1, dtype="float32", device="cpu")
MODES = {mode.name: mode for mode in (CPU, GPU, SIM, HOST)}

# Mixed sizes for the CPU mode: one in four is a large 12 MP JPEG, as from a phone camera.
CPU_SIZES = [(4000, 3000), (640, 480), (1024, 768), (300, 1200), (1600, 400), (96, 96), (3000, 4000), (800, 800)]
GPU_SIZE = (1024, 768)
PHONE_SIZE = (4000, 3000)
QWEN3_VL_8B_LAYERS = TEXT_LAYERS
SIM_PHONE_SHARE = 0.4  # the sim's 12 MP runs take this share of --images: each costs far more CPU


def image_tokens(size: tuple[int, int], max_pixels: int) -> int:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    height, width = smart_resize(size[1], size[0], factor=32, min_pixels=schema.DEFAULT_MIN_PIXELS,
                                 max_pixels=max_pixels)  # fmt: skip
    return height * width // schema.PIXELS_PER_TOKEN


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def cores_for(row: dict[str, Any], busy: float = 0.95) -> float | None:
    """CPU cores that keep one GPU `busy`: the CPU work per image scales with the images a second, so the
    cores the machine kept busy over the window, scaled from the GPU busy time reached to the one asked.
    Meaningful where the CPU side was the limit (its cores near fully busy)."""
    if not row.get("window_cores") or not row.get("gpu_busy"):
        return None
    return row["window_cores"] * busy / row["gpu_busy"]


def markdown(results: dict[str, Any]) -> str:
    if results["mode"] == "host":
        title = f"## Host time of a decode step, transformers' generate loop ({results['machine']})"
        lines = [title, "", "Qwen3-VL at the tiny width (hidden 32), batch 1, one CPU thread, greedy.", ""]
        return "\n".join([*lines, *host_markdown(results["host"]), "", *host_notes(results["host"])]) + "\n"
    settings = results["settings"]
    lines = [
        f"## qwenbatch benchmark ({results['mode']} mode, {results['machine']})",
        "",
        f"{settings['max_new_tokens']} new tokens each (fixed), pixel budget "
        f"{settings['max_pixels'] // schema.PIXELS_PER_TOKEN} visual tokens, batch {settings['batch_size']}, "
        f"{settings['dtype']}",
        "",
    ]
    if results["mode"] == "sim":
        host = results.get("host_ms_per_step")
        if host:
            lines += [f"Each decode step takes at least the host's time to issue it: {host['eager']} ms eager, "
                      f"{host['compiled']} ms compiled ({host['source']}).", ""]  # fmt: skip
        lines += ["| run | images | seconds | ideal images/s | achieved images/s | in the busy window | gpu_busy "
                  "| CPU s per image | cores busy in the window | cores per GPU for 95% "
                  "| replica prepare (ms per image, overlapped) | first output (s) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for row in results["end_to_end"]:
            lines.append(
                f"| {row['name']} | {row['images']} | {row['seconds']:.1f} | {_num(row['ideal_images_per_s'])} | "
                f"{row['images_per_s']:.2f} | {_num(row['busy_window_images_per_s'])} | {_pct(row['gpu_busy'])} | "
                f"{_num(row['cpu_s_per_image'], 3)} | {_num(row['window_cores'], 2)} | "
                f"{_num(cores_for(row), 1)} | {_num(row['prepare_ms_per_image'], 1)} | {row['first_output_s']:.1f} |"
            )
        return "\n".join(lines) + "\n"
    lines += ["| run | images | seconds | images/s | output tokens/s | vs plain | peak memory (GiB) "
              "| first output (s) | images/s after it | gpu_busy | MFU |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    plain = results["end_to_end"][0]["images_per_s"]
    for row in results["end_to_end"]:
        lines.append(
            f"| {row['name']} | {row['images']} | {row['seconds']:.1f} | {row['images_per_s']:.2f} | "
            f"{row['output_tokens_per_s']:.0f} | {row['images_per_s'] / plain:.2f}x | "
            f"{row['peak_memory_bytes'] / 2**30:.2f} | {row['first_output_s']:.1f} | "
            f"{_num(row['after_first_images_per_s'])} | {_pct(row['gpu_busy'])} | {_pct(row['mfu'])} |"
        )
    lines += ["", f"qwenbatch (best) / plain loop: **{results['ratio']:.2f}x** images/s"]
    lines += [f"- {row['name']}, engine occupancy: {occupancy_text(row['engine'])}"
              for row in results["end_to_end"] if row.get("engine")]  # fmt: skip
    lines += [f"- {note}" for note in results.get("notes", [])]
    if results.get("load_stage"):
        lines += ["", "| load stage, large JPEGs | images/s | vs plain |", "| --- | ---: | ---: |"]
        for row in results["load_stage"]:
            lines.append(f"| {row['path']} | {row['images_per_s']:.1f} | {row['ratio']:.2f}x |")
    if results.get("tasks"):
        lines += ["", "| task | batch | latency (s) | peak memory (GiB) |", "| --- | ---: | ---: | ---: |"]
        for row in results["tasks"]:
            lines.append(
                f"| {row['task']} | {row['batch']} | {row['latency_s']:.3f} | {row['peak_memory_bytes'] / 2**30:.2f} |"
            )
    return "\n".join(lines) + "\n"


def sim_runs(
    folder: Path, model_path: str, mode: Mode, slowdown: float, host_s: tuple[float, float] = (0.0, 0.0)
) -> list[Measure]:
    """On a simulated H100: 1024x768 JPEGs decoded eagerly and compiled, then 4000x3000 phone JPEGs without
    and with `jpeg_draft`, compiled. `host_s`: the host's seconds per decode step, eager and compiled."""
    from qwenbatch.batching import token_budget
    from qwenbatch.bench.sim import load_simulated

    load = functools.partial(load_simulated, slowdown=slowdown, host_s=host_s)
    budget = token_budget(int(H100_FREE_AFTER_LOAD), KV_BYTES_PER_TOKEN, mode.batch_size, mode.max_new_tokens)
    phones = max(1, int(mode.images * SIM_PHONE_SHARE))
    runs = []
    for name, size, count, draft, compiled in (
        (f"{GPU_SIZE[0]}x{GPU_SIZE[1]} JPEGs, eager", GPU_SIZE, mode.images, False, False),
        (f"{GPU_SIZE[0]}x{GPU_SIZE[1]} JPEGs, compiled", GPU_SIZE, mode.images, False, True),
        (f"{PHONE_SIZE[0]}x{PHONE_SIZE[1]} JPEGs, compiled", PHONE_SIZE, phones, False, True),
        (f"{PHONE_SIZE[0]}x{PHONE_SIZE[1]} JPEGs, jpeg_draft, compiled", PHONE_SIZE, phones, True, True),
    ):
        manifest = make_bench_images(folder / f"data-{size[0]}x{size[1]}", count, [size])
        output = folder / f"out-sim-{size[0]}x{size[1]}{'-draft' if draft else ''}{'-compiled' if compiled else ''}"
        config = pipeline_config(model_path, manifest, output, mode, draft, compile=compiled, max_batch_tokens=budget)
        runs.append(qwenbatch_run(name, output, config, load=load))
    return runs


def sim_host_seconds(host_ms: tuple[float, float] | None) -> tuple[tuple[float, float], dict[str, Any]]:
    """The host's seconds per decode step the simulated GPU charges, eager and compiled: given, or measured
    here on CPU at the 8B's depth (`bench.host`, which compiles the tiny model: a minute or more)."""
    if host_ms is None:
        from qwenbatch.bench.host import host_step_times

        row = host_step_times(layers=(QWEN3_VL_8B_LAYERS,))[0]
        host_ms = (row["eager_ms_per_step"], row["compiled_ms_per_step"])
        source = f"measured here: {QWEN3_VL_8B_LAYERS} text layers at the tiny width, CPU, one thread"
    else:
        source = "given with --host-ms"
    eager, compiled = host_ms
    return (eager / 1e3, compiled / 1e3), {"eager": eager, "compiled": compiled, "source": source}


def host_notes(rows: list[dict[str, Any]]) -> list[str]:
    """The per-layer slope, between the shallowest and deepest rows of a device: what depth adds to a step."""
    notes = []
    for device in dict.fromkeys(row["device"] for row in rows):
        mine = sorted((row for row in rows if row["device"] == device), key=lambda row: row["layers"])
        low, high = mine[0], mine[-1]
        if high["layers"] == low["layers"]:
            continue
        slopes = [
            f"{name} {(high[key] - low[key]) / (high['layers'] - low['layers']):.3f} ms"
            for name, key in (("eager", "eager_ms_per_step"), ("compiled", "compiled_ms_per_step"))
            if high.get(key) is not None and low.get(key) is not None
        ]
        notes.append(f"- {device}: per text layer per step, {', '.join(slopes)}")
    return notes


def start_ray(mode: Mode) -> None:
    """The simulated GPU is a Ray resource too: replicas are placed as on a GPU node (0 CPUs, 1 GPU)."""
    import ray

    if mode.name == "sim" and not ray.is_initialized():
        init_ray(num_gpus=1, include_dashboard=False, logging_level=logging.WARNING)


def run_bench(
    mode_name: str,
    folder: Path,
    images: int | None = None,
    model: str | None = None,
    max_pixels: int | None = None,
    slowdown: float = 1.0,
    tiny_model: bool = False,
    host_ms: tuple[float, float] | None = None,
    layers: tuple[int, ...] = HOST_LAYERS,
    devices: tuple[str, ...] = HOST_DEVICES,
) -> dict[str, Any]:
    """Run the mode's contenders on the same images; write bench.json and bench.md into `folder`.

    `tiny_model`: the gpu mode's steps with the tiny model, on CPU where there is no GPU (a smoke test).
    `host_ms`: sim: the host's ms per decode step, eager and compiled (None: measured first).
    `layers`, `devices`: host: the text depths timed, and where (CUDA only where there is a GPU).
    """
    import torch

    from qwenbatch.tiny import build_tiny_model

    changes = {"images": images, "max_pixels": max_pixels}
    mode = replace(MODES[mode_name], **{key: value for key, value in changes.items() if value})
    if mode.plain_images:
        mode = replace(mode, plain_images=min(mode.plain_images, mode.images))
    if tiny_model and not torch.cuda.is_available():
        mode = replace(mode, device="cpu", dtype="float32")
    folder.mkdir(parents=True, exist_ok=True)
    if mode.name == "host":
        return _write(folder, {"mode": "host", "machine": machine(), "host": host_rows(layers, devices)})
    tiny = build_tiny_model(folder / "tiny-model")
    start_ray(mode)
    results: dict[str, Any] = {"mode": mode.name, "machine": machine(), "settings": asdict(mode)}
    prompt = schema.DEFAULT_PROMPTS["caption"]
    if mode.name == "sim":
        host_s, host_figures = sim_host_seconds(host_ms)
        results |= {"model": "simulated H100 (Qwen3-VL-8B shape)", "slowdown": slowdown,
                    "host_ms_per_step": host_figures}  # fmt: skip
        results["end_to_end"] = [m.row() for m in sim_runs(folder, model or str(tiny), mode, slowdown, host_s)]
    elif mode.name == "gpu":
        model_path = model or str(tiny if tiny_model else build_random_8b(folder / "qwen3-vl-8b-random", tiny))
        manifest = make_bench_images(folder / "data-gpu", mode.images, [GPU_SIZE])
        tokens = image_tokens(GPU_SIZE, mode.max_pixels) if mode.device == "cuda" else None
        runs = [plain_loop(model_path, manifest, mode, prompt)]
        for name, compiled in (("qwenbatch", False), ("qwenbatch, generation.compile", True)):
            config = pipeline_config(model_path, manifest, folder / f"out{'-compile' * compiled}", mode,
                                     compile=compiled)  # fmt: skip
            runs.append(qwenbatch_run(name, folder / f"out{'-compile' * compiled}", config, image_tokens=tokens))
        engine_runs, notes = vllm_run(model_path, manifest, folder / "out-vllm", mode, image_tokens=tokens)
        results |= _contest(runs + engine_runs, model_path) | {"notes": notes}
    else:
        model_path = model or str(tiny)
        manifest = make_bench_images(folder / "data-cpu", mode.images, CPU_SIZES)
        runs = [plain_loop(model_path, manifest, mode, prompt)]
        for name, draft in (("qwenbatch", False), ("qwenbatch (jpeg_draft)", True)):
            config = pipeline_config(model_path, manifest, folder / f"out{'-draft' * draft}", mode, draft)
            runs.append(qwenbatch_run(name, folder / f"out{'-draft' * draft}", config))
        engine_runs, notes = vllm_run(model_path, manifest, folder / "out-vllm", mode)
        results |= _contest(runs + engine_runs, model_path) | {"notes": notes}
        results["tasks"] = task_table(model_path, manifest, mode)
        import pyarrow.parquet as pq

        paths = [p for p in pq.read_table(manifest, columns=["image"]).column("image").to_pylist() if "4000x3000" in p]
        config = pipeline_config(model_path, manifest, folder / "out", mode)
        results["load_stage"] = load_stage(config, paths[:LOAD_STAGE_IMAGES])
    return _write(folder, results)


def _write(folder: Path, results: dict[str, Any]) -> dict[str, Any]:
    (folder / "bench.json").write_text(json.dumps(results, indent=2))
    (folder / "bench.md").write_text(markdown(results))
    return results


def host_rows(layers: tuple[int, ...], devices: tuple[str, ...] = HOST_DEVICES) -> list[dict[str, Any]]:
    """The host bench on each of `devices` there is here (on CUDA, compiled means CUDA graphs)."""
    import torch

    from qwenbatch.bench.host import host_step_times

    rows = []
    for device in devices:
        if device != "cuda" or torch.cuda.is_available():
            rows += host_step_times(layers, device)
    return rows


def _contest(runs: list[Measure], model_path: str) -> dict[str, Any]:
    best = max(runs[1:], key=lambda m: m.images_per_s)
    return {
        "model": model_path,
        "end_to_end": [m.row() for m in runs],
        "ratio": best.images_per_s / runs[0].images_per_s,
        "plain_batch": PLAIN_BATCH,
    }
