"""Benchmark: qwenbatch against the plain transformers loop, same images, model and output length.

The plain loop is what tutorials show: in one process, open each image with PIL, run the
processor and `generate` on 4 images at a time. qwenbatch runs its real pipeline on Ray.
Output length is fixed (`min_new_tokens == max_new_tokens`) so both do the same work.

Modes:
- cpu: the tiny model, mixed image sizes including large 4000x3000 JPEGs; plus a load-stage
  benchmark (fetch + decode + resize alone against PIL open/convert + the processor).
- gpu: a random-weight model with the exact Qwen3-VL-8B-Instruct shape, bf16, 1024x768
  images, the caption task, 128 new tokens.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qwenbatch import schema

log = logging.getLogger(__name__)

PLAIN_BATCH = 4
LOAD_STAGE_IMAGES = 75  # 4000x3000 JPEGs timed in the load-stage table: a steady figure in seconds
H100_BF16_DENSE_FLOPS = 989e12  # peak dense bf16 tensor FLOP/s of one H100 SXM

# Qwen3-VL-8B-Instruct's shape (DESIGN.md); random weights time exactly like real ones.
QWEN3_VL_8B_TEXT = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 262144,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
}
QWEN3_VL_8B_VISION = {
    "depth": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_heads": 16,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 4096,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [8, 16, 24],
}
QWEN3_VL_8B_PARAMS = 8.77e9


@dataclass(frozen=True)
class Mode:
    name: str
    images: int
    max_new_tokens: int
    max_pixels: int
    batch_size: int
    dtype: str
    device: str


# CPU: enough images that the pipeline's fixed start (Ray workers importing torch, about 9 s on
# 2 cores) is not most of the run, as it is not in a real batch job; `first output` shows it apart.
CPU = Mode("cpu", images=1000, max_new_tokens=16, max_pixels=schema.DEFAULT_MAX_PIXELS, batch_size=32,
           dtype="float32", device="cpu")  # fmt: skip
GPU = Mode("gpu", images=2000, max_new_tokens=128, max_pixels=schema.DEFAULT_MAX_PIXELS, batch_size=32,
           dtype="bfloat16", device="cuda")  # fmt: skip

# Mixed sizes for the CPU mode: one in four is a large 12 MP JPEG, as from a phone camera.
CPU_SIZES = [(4000, 3000), (640, 480), (1024, 768), (300, 1200), (1600, 400), (96, 96), (3000, 4000), (800, 800)]
GPU_SIZE = (1024, 768)


@dataclass
class Measure:
    name: str
    images: int
    seconds: float
    output_tokens: int
    input_tokens: int
    peak_memory_bytes: int
    first_output_s: float  # from the start to the first finished rows: model loading and, on Ray, worker startup
    first_output_rows: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def after_first_images_per_s(self) -> float | None:
        """The rate once the first rows are out: what a run over millions of images settles at."""
        rest = self.seconds - self.first_output_s
        return (self.images - self.first_output_rows) / rest if rest > 0 else None

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def row(self) -> dict[str, Any]:
        after = self.after_first_images_per_s
        return asdict(self) | {
            "images_per_s": round(self.images_per_s, 3),
            "output_tokens_per_s": round(self.output_tokens_per_s, 1),
            "after_first_images_per_s": None if after is None else round(after, 3),
        }


# --- images -------------------------------------------------------------------------------


def photo_like(width: int, height: int, rng: random.Random):
    """Smooth colour fields with detail: compresses like a photo, cheap to make at 12 MP."""
    from PIL import Image, ImageDraw, ImageFilter

    small = Image.effect_noise((max(1, width // 64), max(1, height // 64)), 80).convert("RGB")
    image = small.resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(width), rng.randrange(height)
        radius = rng.randint(4, max(5, min(width, height) // 6))
        colour = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    return image.filter(ImageFilter.SMOOTH)


def make_bench_images(folder: Path, count: int, sizes: list[tuple[int, int]], seed: int = 0) -> Path:
    """JPEGs and a manifest; reused when they already exist, since a 12 MP JPEG takes a while to make."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = folder / f"manifest-{count}.parquet"
    if manifest.exists():
        return manifest
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        path = folder / "images" / f"b{index:05d}_{width}x{height}.jpg"
        if not path.exists():
            photo_like(width, height, rng).save(path, format="JPEG", quality=90)
        rows.append({"id": f"b{index:05d}", "image": str(path), "question": "What is in this picture?"})
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest


# --- memory -------------------------------------------------------------------------------


class PeakRSS:
    """Samples the summed resident memory of this process and its Ray workers on this machine."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *psutil.process_iter(["name", "cmdline"])]:
                try:
                    is_worker = proc.pid != me.pid and "ray::" in (proc.info.get("name") or "") + " ".join(
                        proc.info.get("cmdline") or []
                    )
                    if proc.pid == me.pid or is_worker:
                        total += proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def gpu_peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def gpu_peak() -> int:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0


# --- the two contenders -------------------------------------------------------------------


def plain_loop(model_path: str, manifest: Path, mode: Mode, prompt: str) -> Measure:
    """The tutorial loop: PIL, processor and generate in one process, 4 images at a time."""
    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    paths = pq.read_table(manifest, columns=["image"]).column("image").to_pylist()
    gpu_peak_reset()
    with PeakRSS() as rss:
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
    return Measure("plain transformers loop (batch 4)", len(paths), seconds, output_tokens, input_tokens,
                   gpu_peak() or rss.peak, first_output_s, min(PLAIN_BATCH, len(paths)))  # fmt: skip


def pipeline_config(
    model_path: str, manifest: Path, output: Path, mode: Mode, jpeg_draft: bool = False, task: str = "caption"
):
    from qwenbatch.config import JobConfig

    return JobConfig.model_validate(
        {
            "model": {"name": model_path, "dtype": mode.dtype},
            "task": {"kind": task},
            "generation": {"max_new_tokens": mode.max_new_tokens, "min_new_tokens": mode.max_new_tokens},
            "image": {"jpeg_draft": jpeg_draft} | ({} if task == "document" else {"max_pixels": mode.max_pixels}),
            "input": {"path": str(manifest)},
            "output": {"path": str(output)},
            "run": {"batch_size": mode.batch_size, "device": "auto" if mode.device == "cuda" else "cpu"},
        }
    )


def qwenbatch_run(model_path: str, manifest: Path, output: Path, mode: Mode, jpeg_draft: bool) -> Measure:
    """The real pipeline on the already running Ray, from a cold model to the last shard written."""
    from qwenbatch.pipeline import ensure_ray, run

    shutil.rmtree(output, ignore_errors=True)
    config = pipeline_config(model_path, manifest, output, mode, jpeg_draft)
    ensure_ray()
    with PeakRSS() as rss:
        started = time.time()  # wall clock, as the shards' modification times are
        result = run(config)
        seconds = time.time() - started
    this_run = result.summary["this_run"]
    if this_run["status"].get(schema.OK, 0) != this_run["rows"]:
        raise RuntimeError(f"benchmark rows failed: {result.summary['output']['top_errors']}")
    first_shard, first_rows = first_shard_of(output)
    name = "qwenbatch" + (" (jpeg_draft)" if jpeg_draft else "")
    return Measure(name, this_run["rows"], seconds, this_run["output_tokens"], this_run["input_tokens"], rss.peak,
                   first_shard - started, first_rows)  # fmt: skip


def first_shard_of(output: Path) -> tuple[float, int]:
    """When the first shard of a local output landed, and its rows."""
    import pyarrow.parquet as pq

    first = min(output.glob("*.parquet"), key=lambda path: path.stat().st_mtime)
    return first.stat().st_mtime, pq.read_metadata(first).num_rows


# --- load stage ---------------------------------------------------------------------------


def load_stage(config, paths: list[str]) -> list[dict[str, Any]]:
    """Images/s of getting one image ready for the model, in one process, three ways."""
    from dataclasses import replace

    from PIL import Image

    from qwenbatch.hub import load_processor
    from qwenbatch.load import Resizer, check_location, fetch_bytes, load_image
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


# --- per task -----------------------------------------------------------------------------


def task_table(model_path: str, manifest: Path, mode: Mode, repeats: int = 3) -> list[dict[str, Any]]:
    """Batch-4 latency and peak memory per task, through the GPU stage's own callable class."""
    import pyarrow.parquet as pq
    import torch

    from qwenbatch.hub import load_processor
    from qwenbatch.infer import Generator
    from qwenbatch.load import Resizer, check_location, fetch_bytes, load_image
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
        text = instruction_for(config.task, {"question": "What is in this picture?"})
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


# --- GPU model ----------------------------------------------------------------------------


def qwen3_vl_8b_config(token_ids: dict[str, int] | None = None):
    """The 8B shape; `token_ids` points its special tokens at the tokenizer it will be used with."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(QWEN3_VL_8B_TEXT),
        vision_config=dict(QWEN3_VL_8B_VISION),
        tie_word_embeddings=False,
        **(token_ids or {}),
    )


def count_parameters(config) -> int:
    """Parameters of a model built on the meta device: no memory, exact count."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


def build_random_8b(path: Path, tokenizer_from: Path) -> Path:
    """A random-weight 8B-shaped checkpoint on disk, loadable like the real one; built on the GPU."""
    import json as _json

    import torch
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    if (path / "model.safetensors.index.json").exists():
        return path
    processor = AutoProcessor.from_pretrained(tokenizer_from)
    tiny = _json.loads((tokenizer_from / "config.json").read_text())
    ids = {k: tiny[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    config = qwen3_vl_8b_config(ids)
    with torch.device("cuda"):
        model = Qwen3VLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = tiny.get("eos_token_id")
    model.save_pretrained(path, max_shard_size="5GB")
    processor.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def model_flop_utilisation(measure: Measure, params: float, seconds_per_peak: float = H100_BF16_DENSE_FLOPS) -> float:
    """2 FLOPs per parameter per token processed (prefill and decode); attention not counted."""
    return 2 * params * (measure.input_tokens + measure.output_tokens) / measure.seconds / seconds_per_peak


# --- the whole benchmark ------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lines = [
        f"## qwenbatch benchmark ({results['mode']} mode, {results['machine']})",
        "",
        f"{settings['images']} images, {settings['max_new_tokens']} new tokens each (fixed), "
        f"pixel budget {settings['max_pixels'] // schema.PIXELS_PER_TOKEN} visual tokens, {settings['dtype']}",
        "",
    ]
    lines += ["| run | images | seconds | images/s | output tokens/s | vs plain | peak memory (GiB) "
              "| first output (s) | images/s after it |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    plain = results["end_to_end"][0]["images_per_s"]
    for row in results["end_to_end"]:
        after = row["after_first_images_per_s"]
        lines.append(
            f"| {row['name']} | {row['images']} | {row['seconds']:.1f} | {row['images_per_s']:.2f} | "
            f"{row['output_tokens_per_s']:.0f} | {row['images_per_s'] / plain:.2f}x | "
            f"{row['peak_memory_bytes'] / 2**30:.2f} | {row['first_output_s']:.1f} | "
            f"{'-' if after is None else f'{after:.2f}'} |"
        )
    lines += ["", f"qwenbatch (best) / plain loop: **{results['ratio']:.2f}x** images/s"]
    if results.get("mfu") is not None:
        lines.append(f"model FLOP utilisation (qwenbatch): {100 * results['mfu']:.1f}%")
    if results.get("load_stage"):
        lines += ["", "| load stage, large JPEGs | images/s | vs plain |", "| --- | ---: | ---: |"]
        for row in results["load_stage"]:
            lines.append(f"| {row['path']} | {row['images_per_s']:.1f} | {row['ratio']:.2f}x |")
    lines += ["", "| task | batch | latency (s) | peak memory (GiB) |", "| --- | ---: | ---: | ---: |"]
    for row in results["tasks"]:
        lines.append(
            f"| {row['task']} | {row['batch']} | {row['latency_s']:.3f} | {row['peak_memory_bytes'] / 2**30:.2f} |"
        )
    return "\n".join(lines) + "\n"


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU, {os.cpu_count()} cores"


def run_bench(
    mode_name: str,
    folder: Path,
    images: int | None = None,
    model: str | None = None,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """Run both contenders on the same images; write bench.json and bench.md into `folder`."""
    from qwenbatch.tiny import build_tiny_model

    base = CPU if mode_name == "cpu" else GPU
    changes = {"images": images, "max_pixels": max_pixels}
    mode = Mode(**(asdict(base) | {key: value for key, value in changes.items() if value}))
    folder.mkdir(parents=True, exist_ok=True)
    tiny = build_tiny_model(folder / "tiny-model")
    if mode.name == "gpu":
        model_path = model or str(build_random_8b(folder / "qwen3-vl-8b-random", tiny))
        manifest = make_bench_images(folder / "data-gpu", mode.images, [GPU_SIZE])
    else:
        model_path = model or str(tiny)
        manifest = make_bench_images(folder / "data-cpu", mode.images, CPU_SIZES)
    prompt = schema.DEFAULT_PROMPTS["caption"]
    log.info("benchmark %s: %d images, model %s", mode.name, mode.images, model_path)

    plain = plain_loop(model_path, manifest, mode, prompt)
    runs = [plain, qwenbatch_run(model_path, manifest, folder / "out", mode, jpeg_draft=False)]
    if mode.name == "cpu":
        runs.append(qwenbatch_run(model_path, manifest, folder / "out-draft", mode, jpeg_draft=True))
    best = max(runs[1:], key=lambda m: m.images_per_s)
    results: dict[str, Any] = {
        "mode": mode.name,
        "machine": machine(),
        "settings": asdict(mode),
        "model": model_path,
        "end_to_end": [m.row() for m in runs],
        "ratio": best.images_per_s / plain.images_per_s,
        "mfu": model_flop_utilisation(best, QWEN3_VL_8B_PARAMS) if mode.name == "gpu" else None,
        "tasks": task_table(model_path, manifest, mode),
    }
    if mode.name == "cpu":
        import pyarrow.parquet as pq

        paths = [p for p in pq.read_table(manifest, columns=["image"]).column("image").to_pylist() if "4000x3000" in p]
        paths = paths[:LOAD_STAGE_IMAGES]
        results["load_stage"] = load_stage(pipeline_config(model_path, manifest, folder / "out", mode), paths)
    (folder / "bench.json").write_text(json.dumps(results, indent=2))
    (folder / "bench.md").write_text(markdown(results))
    return results
