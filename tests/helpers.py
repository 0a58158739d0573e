"""Test helpers: real image files of varied sizes and modes, manifests, and job configs."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
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


def stop_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
