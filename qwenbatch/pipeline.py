"""The job: read what is left -> load -> prompt -> infer -> write, as one Ray Data pipeline.

The CLI, the Ray job entrypoints, the demo and the benchmark all call `run`; `run` and
`qwenbatch.process` (a user's own Dataset) apply the same stages, `apply_stages`.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from qwenbatch import attempts, retry, schema, storage
from qwenbatch.answers import Answers
from qwenbatch.attempts import AttemptLedger
from qwenbatch.config import ConfigError, JobConfig, ModelConfig, ProcessConfig
from qwenbatch.console import QUIET_ENV
from qwenbatch.engine_vllm import VllmGenerator, calls_per_replica
from qwenbatch.hub import require_model
from qwenbatch.infer import Generator, ModelLoader
from qwenbatch.inputs import Manifest, find_todo
from qwenbatch.lease import Lease
from qwenbatch.load import Loader
from qwenbatch.locations import LoadLimits, allowed_roots, check_locations
from qwenbatch.preflight import pending, require_output_folder, with_recorded_roots
from qwenbatch.prompt import prompt_batch
from qwenbatch.ray_start import init_ray
from qwenbatch.read import block_rows, open_manifest, read_manifest, sample_locations
from qwenbatch.shards import done_index
from qwenbatch.summary import build_summary, is_complete, read_summary, withdraw_success, write_summary
from qwenbatch.timing import TimingSink, busy_summary
from qwenbatch.write import remove_stale_temp, write_rows

if TYPE_CHECKING:
    from qwenbatch.console import Progress

log = logging.getLogger(__name__)

TASK_CPUS = 1  # left to the read tasks (one CPU each): actors holding every CPU would stall the job


@dataclass(frozen=True)
class Stage:
    """One Ray Data operator with its declared resources: a function becomes tasks, a class actors."""

    name: str
    fn: Callable[..., Any] | type
    num_cpus: float = 1
    num_gpus: float = 0
    concurrency: int | tuple[int, int] | None = None
    batch_size: int | None = schema.MIN_BLOCK_ROWS
    kwargs: dict[str, Any] = field(default_factory=dict)
    calls_per_actor: int = 1  # blocks an actor works on at once, in threads of its own
    env: dict[str, str] = field(default_factory=dict)  # environment variables of its workers

    def compute(self) -> Any:
        """Actors for a class (Ray Data restarts dead ones and retries their batches), tasks otherwise."""
        from ray.data import ActorPoolStrategy, TaskPoolStrategy

        if isinstance(self.fn, type):
            low, high = self.concurrency if isinstance(self.concurrency, tuple) else (self.concurrency or 1,) * 2
            threads = {"max_concurrent_calls_per_actor": self.calls_per_actor, "enable_true_multi_threading": True}
            return ActorPoolStrategy(min_size=low, max_size=high, **(threads if self.calls_per_actor > 1 else {}))
        return TaskPoolStrategy(size=self.concurrency) if self.concurrency else None

    def apply(self, dataset: Any) -> Any:
        is_class = isinstance(self.fn, type)
        return dataset.map_batches(
            self.fn,
            batch_size=self.batch_size,
            batch_format="pyarrow",
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus or None,
            compute=self.compute(),
            fn_constructor_kwargs=self.kwargs if is_class else None,
            fn_kwargs=None if is_class else self.kwargs,
            **({"runtime_env": {"env_vars": self.env}} if self.env else {}),
        )


@dataclass(frozen=True)
class Placement:
    """Where the model replicas run: decided once, on the driver, from the cluster's resources."""

    device: str
    gpus_per_replica: int
    cpu_workers: int = 1  # the most load actors: decoding is the CPU work that must keep up
    loader_cpus: float = 1  # CPUs each load actor reserves; less than one only on the smallest clusters
    cpu_threads: int = 1  # most torch threads of a replica on CPU: Ray's one reserved CPU would leave the rest idle

    @classmethod
    def for_cluster(cls, config: ProcessConfig, cluster_gpus: float, cluster_cpus: float = 1) -> Placement:
        """GPU replicas when the cluster has the GPUs; load actors on the CPUs the replicas leave free."""
        wanted = config.run.device
        replicas = config.run.replicas if isinstance(config.run.replicas, int) else config.run.replicas[1]
        on_cpu = wanted == "cpu" or (wanted == "auto" and cluster_gpus < config.run.gpus_per_replica)
        if on_cpu and wanted == "auto":
            log.warning("no GPU in the Ray cluster: the model runs on CPU")
        if on_cpu and config.run.processor_device == "cuda":
            raise ConfigError("run.processor_device: 'cuda' needs the replicas on GPUs, and they run on CPU here")
        free_cpus = int(cluster_cpus) - (replicas if on_cpu else 0) - TASK_CPUS
        cpu_workers = config.run.cpu_concurrency or max(1, free_cpus)
        loader_cpus = min(1, max(0, free_cpus) / cpu_workers)
        if on_cpu:
            threads = max(1, int(cluster_cpus) // replicas)
            return cls("cpu", 0, cpu_workers=cpu_workers, loader_cpus=loader_cpus, cpu_threads=threads)
        gpus = config.run.gpus_per_replica
        return cls(device="cuda", gpus_per_replica=gpus, cpu_workers=cpu_workers, loader_cpus=loader_cpus)


@dataclass(frozen=True)
class Rows:
    """What the stages know of the rows besides the config: their columns, and where a run keeps its records."""

    id_column: str = schema.ID
    image_column: str = schema.IMAGE
    images_column: str = schema.IMAGES
    records: str | None = None  # a run's output: its attempt ledger and replica timing live there; None: not kept

    @classmethod
    def of(cls, config: ProcessConfig) -> Rows:
        if isinstance(config, JobConfig):
            inputs = config.input
            return cls(inputs.id_column, inputs.image_column, inputs.images_column, config.output.path)
        return cls()


def limits_for(config: ProcessConfig) -> LoadLimits:
    """The load stage's limits; by default a job's rows may point below its manifests' folders, others nowhere."""
    image = config.image
    manifests = config.input.paths() if isinstance(config, JobConfig) else []
    return LoadLimits(
        min_pixels=image.min_pixels,
        max_pixels=config.max_pixels(),
        allowed_prefixes=allowed_roots(image.allowed_prefixes, manifests),
        max_bytes=image.max_bytes,
        max_source_pixels=image.max_source_pixels,
        formats=image.formats,
        fetch_timeout_s=image.fetch_timeout_s,
        fetch_retries=image.fetch_retries,
        fetch_backoff_s=image.fetch_backoff_s,
        max_redirects=image.max_redirects,
        allow_private_network=image.allow_private_network,
        storage=storage.with_environment(config.storage),
        jpeg_draft=image.jpeg_draft,
        memory_mb=config.run.load_memory_mb,
        max_total_pixels=image.max_total_pixels,
        pdf=config.pdf,
    )


def build_stages(
    config: ProcessConfig,
    placement: Placement,
    run_id: str,
    rows_per_block: int = schema.MIN_BLOCK_ROWS,
    load: ModelLoader | None = None,
    rows: Rows | None = None,
) -> list[Stage]:
    """The job's operators; `load` replaces how a replica gets its model (the benchmark's simulated GPU)."""
    model = config.model
    limits = limits_for(config)
    rows = rows or Rows.of(config)
    timing = TimingSink.for_run(rows.records, run_id) if rows.records else None
    return [
        Stage(
            "load",
            Loader,
            num_cpus=placement.loader_cpus,
            concurrency=(1, placement.cpu_workers),
            batch_size=rows_per_block,
            kwargs={
                "model": model.name,
                "revision": model.revision,
                "limits": limits,
                "image_column": rows.image_column,
                "images_column": rows.images_column,
                "id_column": rows.id_column,
                "attempts": _ledger(rows, run_id, "load"),
            },
        ),
        # Chat templating is microseconds a row: Ray Data fuses it into the infer actors.
        Stage(
            "prompt",
            prompt_batch,
            kwargs={"model": model.name, "revision": model.revision, "task": config.task},
        ),
        Stage(
            "infer",
            VllmGenerator if model.engine == "vllm" else Generator,
            num_cpus=1 if placement.device == "cpu" else 0,
            num_gpus=placement.gpus_per_replica,
            concurrency=config.run.replicas,
            batch_size=config.run.batch_size * schema.SORT_WINDOW_BATCHES,
            calls_per_actor=replica_calls(model, config.run.batch_size * schema.SORT_WINDOW_BATCHES),
            env={name: os.environ[name] for name in QUIET_ENV if name in os.environ},
            kwargs={
                "model": model,
                "generation": config.generation,
                "min_pixels": limits.min_pixels,
                "max_pixels": limits.max_pixels,
                "device": placement.device,
                "gpus": max(1, placement.gpus_per_replica),
                "cpu_threads": placement.cpu_threads,
                "batch_size": config.run.batch_size,
                "max_batch_tokens": config.run.max_batch_tokens,
                "processor_device": config.run.processor_device,
                "timing": timing,
                "id_column": rows.id_column,
                "attempts": _ledger(rows, run_id, "infer"),
            }
            | ({"load": load} if load else {}),
        ),
    ]


def replica_calls(model: ModelConfig, rows_per_call: int) -> int:
    """Blocks a replica works on at once: two for transformers (one prepares while one generates); for vLLM, enough
    to keep its engine's in-flight target of requests (`engine_vllm.calls_per_replica`)."""
    if model.engine != "vllm":
        return schema.REPLICA_CONCURRENT_BLOCKS
    return calls_per_replica(model.max_num_seqs, rows_per_call)


def _ledger(rows: Rows, run_id: str, stage: str) -> AttemptLedger | None:
    return AttemptLedger.for_run(rows.records, run_id, stage) if rows.records else None


def apply_stages(dataset: Any, config: ProcessConfig, plan: Plan, rows: Rows | None = None) -> Any:
    """Load, prompt and infer over a Ray dataset, lazily: one row out per row in, each with its status."""
    for stage in build_stages(config, plan.placement, plan.run_id, plan.rows_per_block, plan.load, rows):
        dataset = stage.apply(dataset)
    return dataset


@dataclass(frozen=True)
class Plan:
    """How this run's stages are laid out on the cluster it found."""

    run_id: str
    placement: Placement
    rows_per_block: int
    load: ModelLoader | None = None

    @classmethod
    def for_cluster(cls, config: ProcessConfig, run_id: str, rows: int = 0, load: ModelLoader | None = None) -> Plan:
        """Placement from the cluster's resources (Ray must be up); blocks sized for `rows` (0: unknown, the least)."""
        import ray

        resources = ray.cluster_resources()
        placement = Placement.for_cluster(config, resources.get("GPU", 0), resources.get("CPU", 1))
        replicas = config.run.replicas if isinstance(config.run.replicas, int) else config.run.replicas[1]
        window = config.run.batch_size * schema.SORT_WINDOW_BATCHES
        rows_per_block = block_rows(rows, max(placement.cpu_workers, replicas), config.max_pixels(), window)
        return cls(run_id, placement, rows_per_block, load)


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


@dataclass
class RunResult:
    output: str
    summary: dict[str, Any]
    skipped: bool = False

    @property
    def succeeded(self) -> bool:
        return self.summary.get("state") == "succeeded"


def ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        init_ray(ignore_reinit_error=True, logging_level=logging.WARNING)


def run(
    config: JobConfig,
    *,
    force: bool = False,
    retry_errors: tuple[str, ...] = (),
    max_error_rate: float | None = None,
    load: ModelLoader | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Run the job to completion over whatever the output does not hold yet.

    `retry_errors`: statuses whose rows are done again, each new row replacing its error row (`retry`).
    `max_error_rate`: instead of `output.max_error_rate`.
    `load` replaces `hub.load_model` in the replicas; only the benchmark's simulated GPU passes one.
    `progress` is told the rows to do and each finished block (the command line's progress bar).
    """
    output = config.output.path
    storage.configure(config.storage)  # this process resolves manifest and output URIs with it
    require_output_folder(output)
    if not force and is_complete(output) and not pending(config, retry_errors):
        return RunResult(output=output, summary=read_summary(output) or {}, skipped=True)

    require_model(config.model)  # a checkpoint no replica could get: one line now, before Ray starts
    manifest = open_manifest(config.input)  # job-level errors surface here, before Ray starts
    config = with_recorded_roots(config, manifest)
    check_locations(sample_locations(manifest, config.input), limits_for(config).allowed_prefixes)
    if max_error_rate is not None:
        config = config.model_copy(update={"output": config.output.model_copy()})
        config.output.max_error_rate = max_error_rate  # validated on assignment
    run_id = new_run_id()
    with Lease.acquire(output, run_id, config.run.lease_timeout_s) as lease:  # before anything is written
        summary = _run_held(config, manifest, run_id, lease, retry_errors, load, progress)
    return RunResult(output=output, summary=summary)


def _run_held(
    config: JobConfig,
    manifest: Manifest,
    run_id: str,
    lease: Lease,
    retry_errors: tuple[str, ...],
    load: ModelLoader | None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The run proper, while it holds the output's lease; its summary."""
    output, id_column = config.output.path, config.input.id_column
    if removed := remove_stale_temp(output):
        log.info("removed %d temp files a killed run left in %s", removed, output)
    retry.recover(output, id_column, lease.ensure_held)  # a retry killed while swapping its rows in
    done = done_index(output, id_column)
    plan = retry.plan_retry(output, id_column, retry_errors) if retry_errors else None
    todo = find_todo(manifest, done, plan.keys if plan else None)
    started = time.time()
    log.info(
        "run %s: %d manifest rows, %d already done, %d to process%s",
        run_id,
        manifest.rows,
        manifest.rows - todo.rows,
        todo.rows,
        f" ({plan.rows} error rows of {', '.join(plan.statuses)} again)" if plan else "",
    )

    written = write_rows(None, config.output, id_column)
    if todo.rows:
        withdraw_success(output)  # a run over a grown manifest or a retry: not complete until it says so
        ensure_ray()
        stages = Plan.for_cluster(config, run_id, todo.rows, load)
        dataset = apply_stages(read_manifest(manifest, config.input, todo, stages.rows_per_block), config, stages)
        provenance = {"model": config.model.name, "task": config.task.kind, "run_id": run_id}
        if progress is not None:
            progress.start(todo.rows)
        retried = (plan, retry.staging(output, run_id)) if plan and plan.rows else None
        try:  # the shard writer finalizes the rows as `process` does, on the driver: no operator more
            written = write_rows(
                dataset, config.output, id_column, lease, progress, Answers.of(config.task), retried, **provenance
            )
        finally:
            if progress is not None:
                progress.close()
        if retried:
            retry.commit(output, run_id, plan.shards, id_column, lease.ensure_held)

    elapsed = time.time() - started
    timing = TimingSink.for_run(output, run_id)
    summary = build_summary(config, manifest, run_id, started, elapsed, written, todo.rows)
    summary |= busy_summary(timing.read())
    lease.ensure_held()
    write_summary(output, summary, success=summary["state"] == "succeeded")
    timing.remove_all()  # folded into the summary
    attempts.remove_all(output)
    return summary
