"""Infer stage (GPU actor): one model per replica, batched processor + generate, left padding.

`Generator` is a plain callable class: Ray Data runs it as an actor pool, and tests and
benchmarks construct and call it directly, without Ray.

The model never waits on the CPU: while one batch generates, a second thread prepares the next
(processor, pinned memory, copy to the device on a side stream). Ray Data hands a replica two
blocks at once, so this holds across blocks too; `generate` itself runs one call at a time, as the
model caches `rope_deltas` between calls.

Nor does it wait on Python within `generate`: eager decoding costs about 0.25 ms of host time per layer
per step (`bench --mode host`), about 9 ms a step for the 8B's 36 layers, more than an H100 needs to read
its weights. So on a GPU (`generation.compile: auto`) decoding uses the static KV cache and a compiled step
that CUDA graphs replay as one launch; if compiling fails, the replica logs it once and decodes eagerly.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from qwenbatch import schema
from qwenbatch.attempts import AttemptLedger, Guard, die_if_told
from qwenbatch.batching import bucket_length, bucket_rows, kv_bytes_per_token, pad_prompts_left, plan_batches
from qwenbatch.config import GenerationConfig, ModelConfig
from qwenbatch.cores import CoreShare, free_cores
from qwenbatch.hub import load_model
from qwenbatch.loaded import flat_images, row_images
from qwenbatch.outputs import (
    InferError,
    Output,
    decode_answer,
    guarded_results,
    opens_thinking,
    publish_timing,
    results_table,
)
from qwenbatch.rows import column_or_nulls, error_message
from qwenbatch.timing import ReplicaClock, TimingSink

__all__ = ["CoreShare", "Generator", "ModelLoader", "compile_config", "free_cores", "plan_batches"]

log = logging.getLogger(__name__)

ModelLoader = Callable[[ModelConfig, str, int], Any]


def compile_config(model: Any) -> Any:
    """How a replica compiles its decode step: on CUDA, mode "reduce-overhead" (CUDA graphs: the step's
    launches recorded once, then replayed as one); elsewhere inductor's default mode (tests, `bench --mode host`)."""
    from transformers import CompileConfig

    fullgraph = type(model)._can_compile_fullgraph
    if model.device.type == "cuda":
        return CompileConfig(fullgraph=fullgraph, mode="reduce-overhead")
    config = CompileConfig(fullgraph=fullgraph, mode="default")
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told; tests run on CPU
    return config


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


@dataclass
class Prepared:
    """A batch ready for `generate`: the processor's output on the model's device."""

    inputs: Any
    rows: int  # the batch's own rows; a compiled call's bucket padding comes after them
    input_tokens: list[int]


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
        max_batch_tokens: int | None = None,
        cpu_threads: int | None = None,
        processor_device: str = "cpu",
        timing: TimingSink | None = None,
        load: ModelLoader = load_model,
        id_column: str = schema.ID,
        attempts: AttemptLedger | None = None,
    ) -> None:
        from qwenbatch.hub import load_processor

        self.processor = load_processor(model.name, model.revision)
        self.thinking = opens_thinking(self.processor)
        self.model = load(model, device, gpus)
        self.device = self.model.device.type
        if processor_device == "cuda" and self.device != "cuda":
            raise RuntimeError("run.processor_device 'cuda' needs the replica on a GPU")
        self.processor_kwargs = {"device": self.model.device} if processor_device == "cuda" else {}
        self.cores = CoreShare(min(cpu_threads, os.cpu_count() or 1)) if self.device == "cpu" and cpu_threads else None
        self.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        self.batch_size = batch_size
        self.generation = generation
        self.max_batch_tokens = max_batch_tokens or self._token_budget()
        config = self.model.generation_config
        eos = config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else self.processor.tokenizer.pad_token_id
        self.clock = ReplicaClock.start(self.device)
        self.timing = timing
        self.id_column = id_column
        self.guard = Guard(attempts, "infer")  # its isolated rows run alone: the two blocks in hand die together
        self._generate_lock = threading.Lock()  # one generate at a time: the model caches rope_deltas
        self._processor_lock = threading.Lock()  # a split batch's retry prepares beside the prepare thread
        self._slots = threading.Semaphore(schema.PREFETCH_BATCHES)  # prepared batches held on the device
        self._preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self._ahead: dict[int, Future[Prepared]] = {}  # head starts, by the id of their batch's chats list
        self._copy_stream = self._new_copy_stream()
        self._compile = compile_config(self.model) if generation.compiles_on(self.device) else None

    def _token_budget(self) -> int:
        """On a GPU: from the memory free after the model loaded; elsewhere the fixed default."""
        if self.device != "cuda":
            return schema.DEFAULT_MAX_BATCH_TOKENS
        import torch

        from qwenbatch.batching import token_budget

        free, _ = torch.cuda.mem_get_info(self.model.device)
        per_token = kv_bytes_per_token(self.model.config.text_config, self.model.dtype.itemsize)
        budget = token_budget(free, per_token, self.batch_size, self.generation.max_new_tokens)
        log.info(
            "run.max_batch_tokens unset: %d image tokens per batch, from %.1f GiB free and %d KiB of KV cache "
            "per token",
            budget,
            free / 2**30,
            per_token // 1024,
        )
        return budget

    def _new_copy_stream(self) -> Any:
        if self.device != "cuda":
            return None
        import torch

        return torch.cuda.Stream(self.model.device)

    def generate_kwargs(self, compiled: bool = True) -> dict:
        """`generate`'s arguments; `compiled=False`: eager ones even where the replica compiles."""
        gen = self.generation
        kwargs: dict[str, Any] = {
            "max_new_tokens": gen.max_new_tokens,
            "min_new_tokens": gen.min_new_tokens,
            "do_sample": gen.do_sample,
            "pad_token_id": self.pad_id,
        }
        if gen.do_sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if compiled and self._compile is not None:
            kwargs.update(cache_implementation="static", compile_config=self._compile)
        return kwargs

    # --- one batch: prepare, then generate ------------------------------------------------

    def prepare(self, chats: list[str], images: list) -> Prepared:
        """Processor, bucket padding for a compiled model, and the copy to the device."""
        import torch

        started = time.perf_counter()
        rows = len(chats)
        compiled = self._compile is not None  # read once: a failed compilation turns it off from another thread
        if compiled:  # padding rows repeat the last one; their output is dropped
            extra = bucket_rows(rows, self.batch_size) - rows
            chats, images = chats + chats[-1:] * extra, images + images[-1:] * extra
        side = torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else nullcontext()
        with side:
            with self._processor_lock:  # a fast tokenizer is not safe to call from two threads at once
                inputs = self.processor(
                    text=chats,
                    images=flat_images(images),  # a row of several images gives them in its prompt's order
                    return_tensors="pt",
                    padding=True,
                    size=self.size,
                    do_rescale=False,  # patches stay uint8 until they are on the device: see `_normalize`
                    do_normalize=False,
                    **self.processor_kwargs,
                )
            if compiled:
                inputs = pad_prompts_left(inputs, bucket_length(inputs["input_ids"].shape[1]), self.pad_id)
            input_tokens = inputs["attention_mask"][:rows].sum(dim=1).tolist()
            inputs = self._to_device(inputs)
            inputs["pixel_values"] = self._normalize(inputs["pixel_values"])
            if self._copy_stream is not None:
                self._copy_stream.synchronize()
        self.clock.add(prepare_s=time.perf_counter() - started)
        return Prepared(inputs, rows, input_tokens)

    def _normalize(self, patches: Any) -> Any:
        """The processor's own rescale and normalize, on uint8 patches where they already are.

        Patchifying in uint8 moves a quarter of the bytes, and on a GPU the float work runs there.
        The same elementwise operations as the processor's, in the same order: the same floats. A row
        of patches is (channel, temporal patch, patch row, patch column); viewed as channel-first
        images of (temporal x patch) rows, the per-channel mean and std apply as they do to an image.
        """
        ip = self.processor.image_processor
        if not (ip.do_rescale or ip.do_normalize):
            return patches
        rows, channels = patches.shape[0], len(ip.image_mean)
        as_images = patches.view(rows, channels, ip.temporal_patch_size * ip.patch_size, -1)
        normal = ip.rescale_and_normalize(
            as_images, ip.do_rescale, ip.rescale_factor, ip.do_normalize, ip.image_mean, ip.image_std
        )
        return normal.reshape(rows, -1)

    def _to_device(self, inputs: Any) -> Any:
        """On a GPU: pinned memory, copied on the side stream (`prepare` waits for it to finish)."""
        if self._copy_stream is None:
            return inputs.to(self.model.device)
        import torch

        for name, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                inputs[name] = value.pin_memory().to(self.model.device, non_blocking=True)
        return inputs

    def run(self, prepared: Prepared) -> list[Output]:
        """One `generate` call on a prepared batch; raises on any failure (the caller splits the batch)."""
        import torch

        with self._generate_lock:
            if self.cores:
                torch.set_num_threads(self.cores.threads())
            if self.generation.do_sample:
                torch.manual_seed(self.generation.seed)
            if self._copy_stream is not None:  # the allocator must not reuse these until generate is done
                for value in prepared.inputs.values():
                    if isinstance(value, torch.Tensor):
                        value.record_stream(torch.cuda.current_stream(self.model.device))
            began, started = time.time(), time.perf_counter()
            sequences = self._generate_once(prepared.inputs)
            prompt_length = prepared.inputs["input_ids"].shape[1]
            generated = sequences[: prepared.rows, prompt_length:].tolist()
            memory = torch.cuda.max_memory_allocated(self.model.device) if self.device == "cuda" else 0
            self.clock.add(generate_s=time.perf_counter() - started, batches=1, memory=memory, began=began)
        return [self._output(ids, tokens) for ids, tokens in zip(generated, prepared.input_tokens, strict=True)]

    def _generate_once(self, inputs: Any) -> Any:
        """`generate`, compiled if so set; a compiled call that fails where an eager one succeeds turns compilation
        off for the replica's life, logged once: a broken compiler slows the replica down but never fails a row.

        Running out of memory is not the compiler's fault: it is raised as it is (the caller splits the batch).
        Nor is a failure that eager decoding repeats: that one is raised, and compilation stays on.
        """
        import torch

        compiled = self._compile is not None
        try:
            with torch.inference_mode():
                return self.model.generate(**inputs, **self.generate_kwargs())
        except Exception as exc:
            if not compiled or _out_of_memory(exc):
                raise
            failure = error_message(exc)
        self._release_memory()  # outside the `except`: the failed call's traceback no longer holds its tensors
        with torch.inference_mode():
            sequences = self.model.generate(**inputs, **self.generate_kwargs(compiled=False))
        self._compile = None
        log.warning("generation.compile failed (%s); this replica decodes eagerly from now on", failure)
        return sequences

    def _output(self, generated: list[int], input_tokens: int) -> Output:
        stop = next((i for i, token in enumerate(generated) if token in self.eos_ids), None)
        count = len(generated) if stop is None else stop + 1
        text, reasoning = decode_answer(self.processor.tokenizer, generated[:count], self.thinking)
        return Output(
            text=text,
            reasoning=reasoning,
            input_tokens=int(input_tokens),
            output_tokens=count,
            finish_reason=schema.FINISH_LENGTH if stop is None else schema.FINISH_STOP,
        )

    def generate(self, chats: list[str], images: list) -> list[Output]:
        """One batched `generate` call; raises on any failure (the caller splits the batch).

        Uses the head start `_prepare_ahead` gave this very list of chats, if any; else prepares here.
        """
        future = self._ahead.pop(id(chats), None)
        if future is None:
            return self.run(self.prepare(chats, images))
        prepared = future.result()
        try:
            return self.run(prepared)
        finally:
            self._slots.release()

    def _prepare_ahead(self, chats: list[str], images: list) -> None:
        """Prepare on the second thread, at most `PREFETCH_BATCHES` ahead of `generate`."""

        def task() -> Prepared:
            self._slots.acquire()
            try:
                return self.prepare(chats, images)
            except BaseException:
                self._slots.release()
                raise

        self._ahead[id(chats)] = self._preparer.submit(task)

    def _discard_ahead(self, chats: list[str]) -> None:
        """Free the head start of a batch whose `generate` never took it (it failed before, or was replaced)."""
        future = self._ahead.pop(id(chats), None)
        if future is not None and future.exception() is None:
            self._slots.release()

    def generate_resilient(self, chats: list[str], images: list) -> list[Output | InferError]:
        """Split a failing batch (out of memory or any error) in halves, down to single rows.

        The retry runs outside the `except` block: the failed call's traceback holds its tensors,
        and the halves only fit once those are freed.
        """
        try:
            return list(self.generate(chats, images))
        except Exception as exc:  # noqa: BLE001 - retried smaller, then recorded on the row
            failure = InferError(error_message(exc))
        finally:
            self._discard_ahead(chats)
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

        if self.device == "cuda":
            torch.cuda.empty_cache()

    # --- one block of rows from Ray Data ---------------------------------------------------

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            results = guarded_results(batch, self.id_column, self.clock, self.guard, self._generate_rows)
        finally:
            publish_timing(self.clock, self.timing)
        return results_table(batch, results)

    def _generate_rows(self, batch: pa.Table, rows: list[int]) -> dict[int, Output | InferError]:
        chats = column_or_nulls(batch, schema.CHAT)
        pixels = column_or_nulls(batch, schema.PIXELS)
        widths = column_or_nulls(batch, schema.WIDTH)
        heights = column_or_nulls(batch, schema.HEIGHT)
        tokens = column_or_nulls(batch, schema.IMAGE_TOKENS)
        sizes = column_or_nulls(batch, schema.SIZES)
        groups = plan_batches([tokens[i] for i in rows], self.batch_size, self.max_batch_tokens)
        inputs = []
        for group in groups:  # a group's images, then its head start: the first prepare need not wait for all
            picked = [rows[g] for g in group]
            images = [row_images(pixels[i], widths[i], heights[i], sizes[i]) for i in picked]
            pair = ([chats[i] for i in picked], images)
            self._prepare_ahead(*pair)  # taken, or discarded, by generate_resilient below
            inputs.append(pair)
        results: dict[int, Output | InferError] = {}
        ids = column_or_nulls(batch, self.id_column)
        for group, pair in zip(groups, inputs, strict=True):
            die_if_told("infer", [str(ids[rows[g]]) for g in group])
            outputs = self.generate_resilient(*pair)
            results.update((rows[g], output) for g, output in zip(group, outputs, strict=True))
        return results
