"""The contenders: the plain transformers loop and the real pipeline; plus the load-stage and per-task tables."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenbatch import schema
from qwenbatch.bench.cost import MERGE, BatchShape, batch_flops, model_flop_utilisation
from qwenbatch.bench.images import QUESTION
from qwenbatch.bench.measure import CpuSeconds, Measure, PeakRSS, gpu_peak, gpu_peak_reset
from qwenbatch.infer import ModelLoader

PLAIN_BATCH = 4
VLLM_ROW = "qwenbatch, engine vllm"
VLLM_CPU_KV_CACHE_GIB = 2  # vLLM on CPU: a fixed KV cache, as its default share of the machine's memory is most of it


@dataclass(frozen=True)
class Mode:
    name: str
    images: int
    max_new_tokens: int
    max_pixels: int
    batch_size: int
    dtype: str
    device: str
    plain_images: int | None = None  # the plain loop on the first this many images; None: all, 0: none


def plain_loop(model_path: str, manifest: Path, mode: Mode, prompt: str) -> Measure:
    """The tutorial loop: PIL, processor and generate in one process, 4 images at a time."""
    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    paths = pq.read_table(manifest, columns=["image"]).column("image").to_pylist()[: mode.plain_images]
    gpu_peak_reset()
    with PeakRSS() as rss, CpuSeconds() as cpu:
        started = time.perf_counter()
        processor = AutoProcessor.from_pretrained(model_path)
        processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=getattr(torch, mode.dtype))
        model = model.to(mode.device).eval()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        size = {"shortest_edge": schema.DEFAULT_MIN_PIXELS, "longest_edge": mode.max_pixels}
        output_tokens = input_tokens = 0
        first_output_s = 0.0
        for start in range(0, len(paths), PLAIN_BATCH):
            images = [Image.open(p).convert("RGB") for p in paths[start : start + PLAIN_BATCH]]
            inputs = processor(
                text=[chat] * len(images), images=images, return_tensors="pt", padding=True, size=size
            ).to(mode.device)
            with torch.inference_mode():
                out = model.generate(
                    **inputs,
                    max_new_tokens=mode.max_new_tokens,
                    min_new_tokens=mode.max_new_tokens,
                    do_sample=False,
                )
            output_tokens += (out.shape[1] - inputs["input_ids"].shape[1]) * len(images)
            input_tokens += int(inputs["attention_mask"].sum())
            first_output_s = first_output_s or time.perf_counter() - started
        seconds = time.perf_counter() - started
    del model
    return Measure(
        f"plain transformers loop (batch {PLAIN_BATCH})",
        len(paths),
        seconds,
        output_tokens,
        input_tokens,
        gpu_peak() or rss.peak,
        first_output_s,
        min(PLAIN_BATCH, len(paths)),
        cpu_s_per_image=round(cpu.seconds / len(paths), 4),
    )


def pipeline_config(
    model_path: str,
    manifest: Path,
    output: Path,
    mode: Mode,
    jpeg_draft: bool = False,
    task: str = "caption",
    compile: bool = False,
    max_batch_tokens: int | None = None,
    engine: str = "transformers",
):
    from qwenbatch.config import JobConfig

    model: dict[str, Any] = {"name": model_path, "dtype": mode.dtype, "engine": engine}
    if engine == "vllm" and mode.device == "cpu":
        model["kv_cache_gib"] = VLLM_CPU_KV_CACHE_GIB
    return JobConfig.model_validate(
        {
            "model": model,
            "task": {"kind": task},
            "generation": {
                "max_new_tokens": mode.max_new_tokens,
                "min_new_tokens": mode.max_new_tokens,
                "compile": compile,
            },
            "image": {"jpeg_draft": jpeg_draft} | ({} if task == "document" else {"max_pixels": mode.max_pixels}),
            "input": {"path": str(manifest)},
            "output": {"path": str(output)},
            "run": {
                "batch_size": mode.batch_size,
                "device": "cpu" if mode.device == "cpu" else "auto",
                "max_batch_tokens": max_batch_tokens,
            },
        }
    )


def qwenbatch_run(
    name: str, output: Path, config: Any, load: ModelLoader | None = None, image_tokens: int | None = None
) -> Measure:
    """The real pipeline on the already running Ray, from a cold model to the last shard written.

    `image_tokens`: on a GPU, every image's visual tokens (all one size): gives model FLOP utilisation.
    """
    from qwenbatch.pipeline import ensure_ray, run

    shutil.rmtree(output, ignore_errors=True)
    ensure_ray()
    with PeakRSS() as rss, CpuSeconds() as cpu:
        started = time.time()  # wall clock, as the shards' modification times are
        result = run(config, load=load)
        seconds = time.time() - started
    summary = result.summary
    this_run = summary["this_run"]
    if this_run["status"].get(schema.OK, 0) != this_run["rows"]:
        raise RuntimeError(f"benchmark rows failed: {summary['output']['top_errors']}")
    first_shard, first_rows = first_shard_of(output)
    replicas = summary["replicas"]["each"]
    gpu_memory = max((r["peak_memory_bytes"] for r in replicas), default=0)
    measure = Measure(
        name,
        this_run["rows"],
        seconds,
        this_run["output_tokens"],
        this_run["input_tokens"],
        gpu_memory or rss.peak,
        first_shard - started,
        first_rows,
        gpu_busy=summary["gpu_busy"],
        cpu_s_per_image=round(cpu.seconds / this_run["rows"], 4),
        ideal_images_per_s=round(this_run["rows"] / summary["replicas"]["generate_s"], 3),
        busy_window_images_per_s=round(this_run["rows"] / summary["replicas"]["window_s"], 3),
        prepare_ms_per_image=round(1000 * summary["replicas"]["prepare_s"] / this_run["rows"], 2),
        engine=summary["replicas"].get("engine"),
    )
    if replicas and summary["replicas"]["window_s"]:
        first, last = min(r["started"] for r in replicas), max(r["ended"] for r in replicas)
        measure.window_cores = round(cpu.between(first, last) / (last - first), 2)
    if image_tokens:
        measure.mfu = steady_mfu(measure, image_tokens)
    return measure


def vllm_run(
    model_path: str, manifest: Path, output: Path, mode: Mode, image_tokens: int | None = None
) -> tuple[list[Measure], list[str]]:
    """The pipeline with `model.engine: vllm` on the same images; none, with a note, where vLLM is not installed."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return [], [f"{VLLM_ROW}: skipped, vLLM is not installed here (docs/vllm.md)"]
    if mode.device == "cuda":  # what this process's allocator kept from the plain loop would count as taken
        import torch

        torch.cuda.empty_cache()
    config = pipeline_config(model_path, manifest, output, mode, engine="vllm")
    return [qwenbatch_run(VLLM_ROW, output, config, image_tokens=image_tokens)], []


def steady_mfu(measure: Measure, image_tokens: int) -> float | None:
    """Model FLOP utilisation at the rate after the first output, for images all of one size."""
    rate = measure.after_first_images_per_s
    if rate is None:
        return None
    per_image = BatchShape(
        rows=1,
        prompt_tokens=round(measure.input_tokens / measure.images),
        image_patches=(image_tokens * MERGE,),
        new_tokens=round(measure.output_tokens / measure.images),
    )
    return round(model_flop_utilisation(batch_flops(per_image) * rate, 1.0), 4)


def first_shard_of(output: Path) -> tuple[float, int]:
    """When the first shard of a local output landed, and its rows."""
    import pyarrow.parquet as pq

    first = min(output.glob("*.parquet"), key=lambda path: path.stat().st_mtime)
    return first.stat().st_mtime, pq.read_metadata(first).num_rows


def load_stage(config, paths: list[str]) -> list[dict[str, Any]]:
    """Images/s of getting one image ready for the model, in one process, three ways."""
    from dataclasses import replace

    from PIL import Image

    from qwenbatch.decode import Resizer, fetch_bytes, load_image
    from qwenbatch.hub import load_processor
    from qwenbatch.locations import check_location
    from qwenbatch.pipeline import limits_for

    image_processor = load_processor(config.model.name, None).image_processor
    size = {"shortest_edge": config.image.min_pixels, "longest_edge": config.max_pixels()}

    def plain(path: str) -> None:
        image_processor(images=[Image.open(path).convert("RGB")], size=size, return_tensors="pt")

    def ours(draft: bool):
        limits = replace(limits_for(config), jpeg_draft=draft)
        resize = Resizer(config.model.name, None, limits)
        return lambda path: load_image(fetch_bytes(check_location(path, limits), limits), limits, resize)

    rows = []
    for name, fn in (
        ("plain: PIL open + convert + processor (float32 pixel_values)", plain),
        ("qwenbatch load: fetch + guard + decode + resize (uint8)", ours(False)),
        ("qwenbatch load, jpeg_draft: reduced-size JPEG decode", ours(True)),
    ):
        fn(paths[0])  # warm up
        started = time.perf_counter()
        for path in paths:
            fn(path)
        seconds = time.perf_counter() - started
        rows.append({"path": name, "images": len(paths), "seconds": round(seconds, 3),
                     "images_per_s": round(len(paths) / seconds, 2)})  # fmt: skip
    base = rows[0]["images_per_s"]
    for row in rows:
        row["ratio"] = round(row["images_per_s"] / base, 2)
    return rows


def task_table(model_path: str, manifest: Path, mode: Mode, repeats: int = 3) -> list[dict[str, Any]]:
    """Batch-4 latency and peak memory per task, through the GPU stage's own callable class."""
    import pyarrow.parquet as pq
    import torch

    from qwenbatch.decode import Resizer, fetch_bytes, load_image
    from qwenbatch.hub import load_processor
    from qwenbatch.infer import Generator
    from qwenbatch.locations import check_location
    from qwenbatch.pipeline import limits_for
    from qwenbatch.prompt import chat_messages, instruction_for

    paths = pq.read_table(manifest, columns=["image"]).column("image").to_pylist()[:PLAIN_BATCH]
    processor = load_processor(model_path, None)
    rows = []
    for kind in ("caption", "vqa", "document"):
        config = pipeline_config(model_path, manifest, manifest.parent / "unused", mode, task=kind)
        limits = limits_for(config)
        resize = Resizer(model_path, None, limits)
        arrays = [load_image(fetch_bytes(check_location(p, limits), limits), limits, resize) for p in paths]
        images = [torch.from_numpy(array).permute(2, 0, 1) for array in arrays]
        text = instruction_for(config.task, {"question": QUESTION})
        messages = chat_messages(config.task, text)
        chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        generator = Generator(config.model, config.generation, limits.min_pixels, limits.max_pixels, mode.device)
        generator.generate([chat] * len(images), images)  # warm up
        gpu_peak_reset()
        with PeakRSS() as rss:
            started = time.perf_counter()
            for _ in range(repeats):
                outputs = generator.generate([chat] * len(images), images)
            latency = (time.perf_counter() - started) / repeats
        rows.append(
            {
                "task": kind,
                "batch": len(images),
                "image_tokens": [a.shape[0] * a.shape[1] // schema.PIXELS_PER_TOKEN for a in arrays],
                "input_tokens": [o.input_tokens for o in outputs],
                "latency_s": round(latency, 3),
                "peak_memory_bytes": gpu_peak() or rss.peak,
            }
        )
        del generator
    return rows
