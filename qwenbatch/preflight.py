"""What a run checks on the driver before it starts Ray or writes anything: the output can be a folder,
the output still has work, and where the manifest's rows may be read.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qwenbatch import retry, storage
from qwenbatch.config import ConfigError, JobConfig
from qwenbatch.inputs import Manifest, find_todo
from qwenbatch.locations import allowed_roots
from qwenbatch.read import open_manifest
from qwenbatch.shards import done_index

log = logging.getLogger(__name__)


def require_output_folder(output: str) -> None:
    """A local output.path that is a file, or lies below one, can never become the run's folder: one line, now.

    On an object store a key where the folder should be does not stop the run's own keys from being written.
    """
    fs, path = storage.resolve(output)
    if not storage.is_local(fs):
        return
    for where in (Path(path), *Path(path).parents):
        if where.exists():
            if not where.is_dir():
                shown = output if where == Path(path) else f"{output}: {where}"
                raise ConfigError(f"output.path: {shown} is a file, not a folder")
            return


def pending(config: JobConfig, retry_errors: tuple[str, ...]) -> bool:
    """Whether a complete output still has work: manifest rows it lacks (a grown manifest), or errors to retry.

    Reads the manifest's ids and the output's indexes, never a shard's rows unless errors are retried.
    """
    output = config.output.path
    if retry_errors and retry.plan_retry(output, config.input.id_column, retry_errors).rows:
        return True
    manifest = open_manifest(config.input)
    return find_todo(manifest, done_index(output, config.input.id_column)).rows > 0


def with_recorded_roots(config: JobConfig, manifest: Manifest) -> JobConfig:
    """A manifest written by `qwenbatch manifest` names the folder it walked: its rows may be read there too.

    Only when `image.allowed_prefixes` is not set; manifests without that record get nothing more.
    """
    if config.image.allowed_prefixes is not None or not manifest.roots:
        return config
    allowed = (*allowed_roots(None, config.input.paths()), *manifest.roots)
    log.info("images allowed under %s (the manifests' folders and the folders they were made for)", allowed)
    image = config.image.model_copy(update={"allowed_prefixes": tuple(dict.fromkeys(allowed))})
    return config.model_copy(update={"image": image})
