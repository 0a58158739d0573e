"""A simulated GPU: the real pipeline with the model replaced by a stand-in that takes an H100's time.

Everything else is real: load, prompt, the processor, Ray Data, the write. For each `generate`
call the stand-in sleeps (which does not hold the GIL) for `cost.h100_seconds` of the batch and
returns fixed token ids, so what the run measures is whether the CPU side keeps an H100 busy.

Each decode step takes at least the host's time to issue it (`bench.host`): `eager_host_s` for an
eager replica's call, `compiled_host_s` for a compiled one's (the replica passes a `compile_config`,
after padding the batch to its bucket, as on a GPU).
It lives here, in the benchmark; the job reaches it only through `pipeline.run(..., load=...)`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from qwenbatch.bench.cost import BatchShape, h100_seconds
from qwenbatch.config import ModelConfig

FILLER_TOKEN = "a"  # what every simulated answer repeats


@dataclass
class SimulatedModel:
    """Stands in for `Qwen3VLForConditionalGeneration` in `Generator`: same inputs, H100 timing.

    `slowdown` stretches every call (2.0: a GPU half as fast); `seconds` sums the simulated time.
    """

    generation_config: Any
    token_id: int
    slowdown: float = 1.0
    eager_host_s: float = 0.0  # host seconds per decode step, eager
    compiled_host_s: float = 0.0  # and with `generation.compile`
    seconds: float = 0.0
    calls: int = 0
    device: Any = field(default=None)
    _can_compile_fullgraph = True  # as Qwen3-VL declares: `infer.compile_config` reads it

    def __post_init__(self) -> None:
        import torch

        self.device = torch.device("cpu")

    def eval(self) -> SimulatedModel:
        return self

    def generate(
        self, input_ids: Any, image_grid_thw: Any, max_new_tokens: int, compile_config: Any = None, **_: Any
    ) -> Any:
        import torch

        shape = BatchShape(
            rows=input_ids.shape[0],
            prompt_tokens=input_ids.shape[1],
            image_patches=tuple(int(t * h * w) for t, h, w in image_grid_thw.tolist()),
            new_tokens=max_new_tokens,
        )
        host = self.eager_host_s if compile_config is None else self.compiled_host_s
        seconds = h100_seconds(shape, host) * self.slowdown
        time.sleep(seconds)
        self.seconds += seconds
        self.calls += 1
        answer = torch.full((shape.rows, max_new_tokens), self.token_id, dtype=input_ids.dtype)
        return torch.cat([input_ids, answer], dim=1)


def load_simulated(
    config: ModelConfig, device: str, gpus: int, slowdown: float = 1.0, host_s: tuple[float, float] = (0.0, 0.0)
) -> SimulatedModel:
    """A `pipeline.run(load=...)` loader: the checkpoint's tokenizer and generation config, no weights.

    `host_s`: host seconds per decode step, eager and compiled."""
    from transformers import GenerationConfig

    from qwenbatch.hub import load_processor

    tokenizer = load_processor(config.name, config.revision).tokenizer
    generation = GenerationConfig.from_pretrained(config.name, revision=config.revision)
    return SimulatedModel(generation, tokenizer.convert_tokens_to_ids(FILLER_TOKEN), slowdown, *host_s)
