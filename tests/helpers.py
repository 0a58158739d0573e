"""Test helpers: real image files of varied sizes and modes, manifests, and job configs."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
KILL_TIMEOUT_S = 300  # a `qwenbatch run` in its own process: to its first shard, or to its end

# tiny, wide, tall, large and ordinary
MIXED_SIZES = [(1, 1), (12, 20), (900, 120), (120, 700), (1600, 1200), (320, 240), (240, 320), (64, 64), (500, 333)]


def noise_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A flat colour with 8x8 blocks of noise; the same image for the same seed, whatever ran before."""
    rng = np.random.default_rng(seed)
    base = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
    shape = (max(1, height // 8), max(1, width // 8), 3)
    blocks = Image.fromarray(np.clip(rng.normal(128, 64, shape), 0, 255).astype(np.uint8), "RGB")
    image = Image.blend(base, blocks.resize((width, height)), 0.5)
    return image.convert(mode) if mode != "RGB" else image


@contextmanager
def moto_s3(bucket: str) -> Iterator[str]:
    """A real S3-compatible server (moto) on a free loopback port, with `bucket` made: its endpoint.

    Credentials come from the environment, which the caller sets first.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(bucket)
        yield endpoint
    finally:
        server.stop()


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def write_images(folder: Path, count: int, sizes=MIXED_SIZES, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        fmt = "PNG" if index % 2 else "JPEG"
        path = folder / f"img_{index:04d}.{fmt.lower()}"
        path.write_bytes(encode(noise_image(width, height, seed + index), fmt))
        paths.append(path)
    return paths


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read_output(folder: Path | str) -> pa.Table:
    import pyarrow.dataset as pads

    return pads.dataset(str(folder), format="parquet").to_table()


def job_data(model: Path, manifest: Path | str, output: Path | str, **sections: dict[str, Any]) -> dict[str, Any]:
    """A CPU job config for the tiny model, as plain data; `sections` override or extend each section."""
    data: dict[str, Any] = {
        "model": {"name": str(model), "dtype": "float32"},
        "task": {"kind": "caption"},
        "generation": {"max_new_tokens": 8},
        "image": {"min_pixels": 32 * 32 * 4, "max_pixels": 32 * 32 * 64},
        "input": {"path": str(manifest)},
        "output": {"path": str(output)},
        "run": {"batch_size": 4, "device": "cpu"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def job_config(model: Path, manifest: Path | str, output: Path | str, **sections: dict[str, Any]):
    """The validated config of `job_data`."""
    from qwenbatch.config import JobConfig

    return JobConfig.model_validate(job_data(model, manifest, output, **sections))


def qwen_bpe():
    """tiktoken's own BPE over Qwen's ranks, with Qwen's pre-tokenizer split: a reference for Qwen's token ids
    (of NFC-normalised text, as Qwen's tokenizer normalises first)."""
    import tiktoken

    from qwenbatch.tiny_tokenizer import qwen_ranks

    pattern = (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
        r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
    )
    return tiktoken.Encoding("qwen", pat_str=pattern, mergeable_ranks=qwen_ranks(), special_tokens={})


# --- real `qwenbatch run` processes ------------------------------------------------------------


def start_run(job: Path, log: Path, ray_dir: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    environment |= {"RAY_TMPDIR": ray_dir, "PYTHONPATH": str(REPO)} | (env or {})
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "qwenbatch.cli", "run", str(job)],
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: its Ray goes with it
        )


class PlainTransformers:
    """What the fidelity tests compare with: the plain processor + greedy `generate`, one prompt at a time,
    its images given in the prompt's order before the text."""

    def __init__(self, model: Path) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model)
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32).eval()

    def answer(self, images: list, text: str, size: dict[str, int], max_new_tokens: int) -> str:
        import torch

        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        chat = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        inputs = self.processor(text=[chat], images=images, return_tensors="pt", size=size)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return self.processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def write_job(path: Path, model: Path, manifest: Path, output: Path, **sections: dict) -> Path:
    """A YAML job config as a user writes one: the CLI reads it, as it would in a nightly job."""
    path.write_text(json.dumps(job_data(model, manifest, output, **sections)))  # JSON is YAML
    return path


def write_killable_job(path: Path, model: Path, manifests: Path, output: Path, allowed: Path) -> Path:
    """A job slow enough (16 new tokens a row, batches of 2) that a kill at its first shard lands mid-run."""
    return write_job(
        path,
        model,
        manifests,
        output,
        image={"allowed_prefixes": [str(allowed)]},
        generation={"max_new_tokens": 16, "min_new_tokens": 16},
        run={"batch_size": 2},
    )


def ray_processes(marker: str, workers_only: bool = False) -> list[int]:
    """Processes whose environment carries a run's private Ray temp dir: that job's own.

    `workers_only`: those that run tasks and actors (Ray names them `ray::...`), the ones that could
    still write a shard; a worker that was only starting when the raylet died exits by itself later.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                if not workers_only or (entry / "cmdline").read_bytes().startswith(b"ray::"):
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def wait_for_exit(marker: str, deadline: float, workers_only: bool = False) -> list[int]:
    """The processes still there at the deadline, each killed then (only ever the killed job's own)."""
    while (left := ray_processes(marker, workers_only)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


@contextmanager
def private_ray_dirs(count: int) -> Iterator[list[str]]:
    """Short private Ray temp dirs (Ray's socket paths have a length limit), one per `qwenbatch run`;
    whatever of those runs is left at the end is killed, and the dirs removed."""
    dirs = [tempfile.mkdtemp(prefix="qb-ray-", dir="/tmp") for _ in range(count)]
    try:
        yield dirs
    finally:
        for ray_dir in dirs:
            wait_for_exit(ray_dir, 0)
            shutil.rmtree(ray_dir, ignore_errors=True)


def kill_at_first_shard(job: Path, out: Path, log: Path, ray_dir: str) -> float:
    """Start `qwenbatch run`, SIGKILL its whole process group once its first shard lands, and see its
    workers gone: the crash a rerun must recover from. Returns the time of the kill."""
    run = start_run(job, log, ray_dir)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while not list(out.glob("part-*.parquet")):
        assert run.poll() is None, f"the job ended before writing a shard:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no shard after {KILL_TIMEOUT_S}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    killed_at = time.monotonic()
    assert not wait_for_exit(ray_dir, killed_at + 30, workers_only=True), "workers outlived the kill"
    return killed_at


def stop_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
