"""Host time of a decode step: the Python and dispatch that transformers' `generate` loop spends per token.

The model is Qwen3-VL at the tiny width (hidden 32: its kernels cost next to nothing) with a given number
of text layers (36, the 8B's depth, by default), random weights, built in memory. What one decode step of the
real `generate` loop takes there is what the host needs per step whatever the width: the time a GPU waits
on Python when the step's kernels are shorter. Measured eager and with the replica's `generation.compile`
(`infer.compile_config`: on CUDA the static cache and a step replayed as CUDA graphs; on CPU inductor's code).

One image prompt, batch 1, one CPU thread, greedy, up to `HOST_STEPS` new tokens. Each step's end is stamped
by a streamer (`generate` hands it every new token); a step's time is the median gap between stamps, prefill
excluded, within a `generate` call; the least of `TIMED_CALLS` calls after a first one (which compiles): other
work on the machine only ever adds to it. No `min_new_tokens`: on CPU its logits
processor scans the whole 151,936-token vocabulary each step (`torch.isin`, about 4 ms on one thread), a
kernel's cost that a GPU does not have; the random weights do not stop early in practice, and the median
needs only a few steps.

At the tiny width the kernels are short but not free on a CPU: the LM head still multiplies by the whole
vocabulary (151,936 x 32). What grows with depth is Python and dispatch: the table's per-layer slope.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

HOST_LAYERS = (2, 36)  # the tiny model's depth and the 8B's
HOST_DEVICES = ("cpu", "cuda")  # cuda where there is one
HOST_STEPS = 48  # decode steps per timed `generate` call
SKIP_STEPS = 2  # the prompt's stamp and the first step (prefill) are not decode steps
MIN_STEPS = 8  # decode steps a median needs
TIMED_CALLS = 3


class StepClock:
    """A `generate` streamer that only stamps the time of each `put`: once for the prompt, then once a step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: Any) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def step_seconds(self) -> float:
        gaps = [b - a for a, b in zip(self.stamps[SKIP_STEPS - 1 :], self.stamps[SKIP_STEPS:], strict=False)]
        if len(gaps) < MIN_STEPS:
            raise RuntimeError(f"generate stopped after {len(self.stamps) - 1} tokens: too few steps to time")
        return statistics.median(gaps)


def decode_step_seconds(model: Any, inputs: Any, compiled: bool, steps: int = HOST_STEPS) -> tuple[float, float]:
    """Host seconds per decode step of `generate` on `inputs`, and the seconds of the first (compiling) call."""
    import torch

    from qwenbatch.infer import compile_config

    kwargs: dict[str, Any] = {"max_new_tokens": steps, "do_sample": False}
    if compiled:
        kwargs |= {"cache_implementation": "static", "compile_config": compile_config(model)}
    timings = []
    for _ in range(1 + TIMED_CALLS):
        clock = StepClock()
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, streamer=clock, **kwargs)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        timings.append((clock.step_seconds(), time.perf_counter() - started))
    return min(step for step, _ in timings[1:]), timings[0][1]


def host_step_times(
    layers: tuple[int, ...] = HOST_LAYERS, device: str = "cpu", compiled: tuple[bool, ...] = (False, True)
) -> list[dict[str, Any]]:
    """One row per depth: ms per decode step eager and compiled (None where not asked), on `device`, one thread."""
    import numpy as np
    import torch
    from PIL import Image

    from qwenbatch.tiny import tiny_in_memory

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for depth in layers:
            model, processor = tiny_in_memory(text_layers=depth)
            model = model.to(device)
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
            chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
            inputs = processor(text=[chat], images=[image], return_tensors="pt").to(device)
            row: dict[str, Any] = {"device": device, "layers": depth, "batch": 1, "threads": 1}
            for mode in compiled:
                torch._dynamo.reset()
                seconds, first = decode_step_seconds(model, inputs, mode)
                name = "compiled" if mode else "eager"
                row |= {f"{name}_ms_per_step": round(seconds * 1e3, 3), f"{name}_first_call_s": round(first, 2)}
            rows.append(row)
            del model
    finally:
        torch.set_num_threads(threads)
    return rows


def host_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| device | text layers | eager ms/step | compiled ms/step | eager / compiled | first compiled call (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        eager, compiled = row.get("eager_ms_per_step"), row.get("compiled_ms_per_step")
        ratio = f"{eager / compiled:.1f}x" if eager and compiled else "-"
        lines.append(
            f"| {row['device']} | {row['layers']} | {eager if eager is not None else '-'} | "
            f"{compiled if compiled is not None else '-'} | {ratio} | {row.get('compiled_first_call_s', '-')} |"
        )
    return lines
