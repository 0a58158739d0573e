"""Infer stage (GPU actor): one model per replica, batched processor + generate, left padding.

`Generator` is a plain callable class: Ray Data runs it as an actor pool, and tests and
benchmarks construct and call it directly, without Ray.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import pyarrow as pa

from qwenbatch import schema
from qwenbatch.config import GenerationConfig, ModelConfig
from qwenbatch.load import pixels_to_array
from qwenbatch.rows import RowError, column_or_nulls, error_message, ok_mask, with_columns

log = logging.getLogger(__name__)

THINK_END = "</think>"
THINK_START = "<think>"


class InferError(RowError):
    """A row that failed in `generate` even alone; carries only the message, never the tensors."""


@dataclass(frozen=True)
class Output:
    text: str
    reasoning: str | None
    input_tokens: int
    output_tokens: int
    finish_reason: str


def split_reasoning(decoded: str) -> tuple[str, str | None]:
    """Thinking variants write `<think>...</think>answer`: return (answer, reasoning)."""
    if THINK_END not in decoded:
        return decoded.strip(), None
    reasoning, _, answer = decoded.partition(THINK_END)
    return answer.strip(), reasoning.replace(THINK_START, "").strip()


def plan_batches(tokens: list[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Row positions grouped for `generate`: similar sizes together, each group's padded size in budget.

    Sorting by image tokens cuts the padding that left-padded batches spend compute on, and
    the token budget (rows x longest row) keeps a batch of large images from running out of memory.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    for position in sorted(range(len(tokens)), key=lambda i: tokens[i]):
        grown = len(current) + 1
        if current and (grown > batch_size or grown * tokens[position] > max_batch_tokens):
            groups.append(current)
            current = []
        current.append(position)
    if current:
        groups.append(current)
    return groups


def free_cores(cores: int, busy_s: float, own_s: float, wall_s: float) -> int:
    """Cores this process may compute on: all but those other processes kept busy over the last interval."""
    others = max(0.0, busy_s - own_s) / wall_s if wall_s > 0 else 0.0
    return max(1, min(cores, round(cores - others)))


class CoreShare:
    """Torch threads for a replica on CPU, renewed before each batch.

    The load actors share the node's cores: threads that compete with them for a core wait on each
    other at every barrier, so the replica computes on the cores they leave free, and on all of
    them once loading is done.
    """

    def __init__(self, cores: int) -> None:
        self.cores = cores
        self.last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        import time

        import psutil

        system = psutil.cpu_times()
        busy = sum(system) - system.idle - getattr(system, "iowait", 0.0)
        own = psutil.Process().cpu_times()
        return busy, own.user + own.system, time.monotonic()

    def threads(self) -> int:
        now = self._sample()
        busy, own, wall = (a - b for a, b in zip(now, self.last, strict=True))
        self.last = now
        return free_cores(self.cores, busy, own, wall)


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but this worker sees no GPU")
    return device


class Generator:
    """Holds one processor and one model for the whole run and captions batches of rows."""

    def __init__(
        self,
        model: ModelConfig,
        generation: GenerationConfig,
        min_pixels: int,
        max_pixels: int,
        device: str = "auto",
        gpus: int = 1,
        batch_size: int = schema.DEFAULT_BATCH_SIZE,
        max_batch_tokens: int = schema.DEFAULT_MAX_BATCH_TOKENS,
        cpu_threads: int | None = None,
    ) -> None:
        from qwenbatch.hub import load_model, load_processor

        self.device = pick_device(device)
        self.cores = CoreShare(min(cpu_threads, os.cpu_count() or 1)) if self.device == "cpu" and cpu_threads else None
        self.processor = load_processor(model.name, model.revision)
        self.model = load_model(model, self.device, gpus)
        self.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.generation = generation
        config = self.model.generation_config
        eos = config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else self.processor.tokenizer.pad_token_id

    def generate_kwargs(self) -> dict:
        gen = self.generation
        kwargs = {
            "max_new_tokens": gen.max_new_tokens,
            "min_new_tokens": gen.min_new_tokens,
            "do_sample": gen.do_sample,
            "pad_token_id": self.pad_id,
        }
        if gen.do_sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def generate(self, chats: list[str], images: list) -> list[Output]:
        """One batched `generate` call; raises on any failure (the caller splits the batch)."""
        import torch

        inputs = self.processor(text=chats, images=images, return_tensors="pt", padding=True, size=self.size)
        inputs = inputs.to(self.model.device)
        if self.generation.do_sample:
            torch.manual_seed(self.generation.seed)
        with torch.inference_mode():
            sequences = self.model.generate(**inputs, **self.generate_kwargs())
        prompt_length = inputs["input_ids"].shape[1]
        input_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        outputs = []
        for row, generated in enumerate(sequences[:, prompt_length:].tolist()):
            stop = next((i for i, token in enumerate(generated) if token in self.eos_ids), None)
            count = len(generated) if stop is None else stop + 1
            decoded = self.processor.tokenizer.decode(generated[:count], skip_special_tokens=True)
            text, reasoning = split_reasoning(decoded)
            outputs.append(
                Output(
                    text=text,
                    reasoning=reasoning,
                    input_tokens=int(input_tokens[row]),
                    output_tokens=count,
                    finish_reason=schema.FINISH_LENGTH if stop is None else schema.FINISH_STOP,
                )
            )
        return outputs

    def generate_resilient(self, chats: list[str], images: list) -> list[Output | InferError]:
        """Split a failing batch (out of memory or any error) in halves, down to single rows.

        The retry runs outside the `except` block: the failed call's traceback holds its tensors,
        and the halves only fit once those are freed.
        """
        try:
            return list(self.generate(chats, images))
        except Exception as exc:  # noqa: BLE001 - retried smaller, then recorded on the row
            failure = InferError(error_message(exc))
        self._release_memory()
        if len(chats) == 1:
            log.warning("row failed in generate: %s", failure)
            return [failure]
        log.warning("batch of %d failed in generate (%s); retrying in halves", len(chats), failure)
        half = len(chats) // 2
        return self.generate_resilient(chats[:half], images[:half]) + self.generate_resilient(
            chats[half:], images[half:]
        )

    def _release_memory(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        rows = [index for index, ok in enumerate(ok_mask(batch)) if ok]
        chats = column_or_nulls(batch, schema.CHAT)
        pixels = column_or_nulls(batch, schema.PIXELS)
        widths = column_or_nulls(batch, schema.WIDTH)
        heights = column_or_nulls(batch, schema.HEIGHT)
        images = [
            torch.from_numpy(pixels_to_array(pixels[i], widths[i], heights[i]).copy()).permute(2, 0, 1) for i in rows
        ]
        tokens = column_or_nulls(batch, schema.IMAGE_TOKENS)
        results: dict[int, Output | InferError] = {}
        for group in plan_batches([tokens[i] for i in rows], self.batch_size, self.max_batch_tokens):
            if self.cores:
                torch.set_num_threads(self.cores.threads())
            outputs = self.generate_resilient([chats[rows[g]] for g in group], [images[g] for g in group])
            results.update((rows[g], output) for g, output in zip(group, outputs, strict=True))
        n = batch.num_rows
        text, reasoning, input_tokens, output_tokens, finish = ([None] * n for _ in range(5))
        statuses = column_or_nulls(batch, schema.STATUS)
        errors = column_or_nulls(batch, schema.ERROR)
        for index, result in results.items():
            if isinstance(result, InferError):
                statuses[index] = schema.INFER_ERROR
                errors[index] = error_message(result)
                continue
            text[index] = result.text
            reasoning[index] = result.reasoning
            input_tokens[index] = result.input_tokens
            output_tokens[index] = result.output_tokens
            finish[index] = result.finish_reason
        batch = batch.drop_columns([c for c in (schema.PIXELS, schema.CHAT) if c in batch.column_names])
        return with_columns(
            batch,
            {
                schema.TEXT: pa.array(text, pa.string()),
                schema.REASONING: pa.array(reasoning, pa.string()),
                schema.STATUS: pa.array(statuses, pa.string()),
                schema.ERROR: pa.array(errors, pa.string()),
                schema.INPUT_TOKENS: pa.array(input_tokens, pa.int32()),
                schema.OUTPUT_TOKENS: pa.array(output_tokens, pa.int32()),
                schema.FINISH_REASON: pa.array(finish, pa.string()),
            },
        )
