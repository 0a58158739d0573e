"""qwenbatch inside a Ray Data pipeline: `process(dataset, config)` returns a Dataset with answers.

The user's rows go through the job's own stages (`pipeline.apply_stages`: load, prompt, infer) and
the row contract's finalize, lazily: nothing runs until the returned Dataset is consumed, written
or chained on. Reading, resume and writing stay the user's (`qwenbatch run` adds them).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qwenbatch import schema
from qwenbatch.answers import Answers
from qwenbatch.config import ProcessConfig, load_process_config
from qwenbatch.console import quiet_ray
from qwenbatch.hub import require_model
from qwenbatch.pipeline import Plan, Rows, Stage, apply_stages, ensure_ray, new_run_id
from qwenbatch.write import finalize_batch


def process(
    dataset: Any,
    config: ProcessConfig | Mapping[str, Any] | str | Path,
    *,
    image_column: str = schema.IMAGE,
    run_id: str | None = None,
    verbose: bool = False,
) -> Any:
    """Answers for every row of a Ray Dataset, as a new Dataset: one row out per row in, never a failed job.

    `image_column` may hold locations (paths, s3://, gs://, https:// under `image.allowed_prefixes`),
    encoded image bytes, or decoded HxWxC uint8 arrays (what `ray.data.read_images` yields); an
    `image_bytes` column works as in a manifest. Every other column is carried through; the image
    itself (bytes or pixels) is not. Rows get the output columns of `schema.OUTPUT_FIELDS`, with
    `status` and `error` saying which failed and why.

    `config`: a `ProcessConfig` or `JobConfig`, a dict or a YAML path; `input` and `output` are
    ignored. The model is checked here (one ConfigError when no replica could get it), then Ray is
    joined or started to size the stages for the cluster, quiet as `qwenbatch run` keeps it (`verbose`: as it is).
    """
    settings = load_process_config(config)
    require_model(settings.model)
    quiet_ray(verbose)
    ensure_ray()
    run_id = run_id or new_run_id()
    plan = Plan.for_cluster(settings, run_id)
    dataset = apply_stages(dataset, settings, plan, Rows(image_column=image_column))
    finalize = {"model": settings.model.name, "task": settings.task.kind, "run_id": run_id}
    finalize |= {"answers": Answers.of(settings.task)}  # `task.output: json`: parsed into the json column
    return Stage("finalize", finalize_batch, batch_size=None, kwargs=finalize).apply(dataset)
