"""Filesystems for manifests, images and outputs: local paths and URIs, resolved in one place.

Object stores (`s3://`, `gs://`) use pyarrow's own clients, which Ray Data reads through directly.
Endpoint and region come from the job config or, when unset, from the driver's environment; they
travel with the job, because a Ray worker's environment need not match the driver's. Credentials
never go into the config (it is saved in the run summary): each process's SDK finds them itself.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from qwenbatch import schema
from qwenbatch.config import StorageConfig

S3_SCHEMES = ("s3",)
GCS_SCHEMES = ("gs", "gcs")
S3_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
S3_REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")
HIDDEN = (".", "_")  # names that are not data: temp files, `_SUCCESS`, `_summary.json`

_active: StorageConfig | None = None


def _env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[name] for name in names if os.environ.get(name)), None)


def with_environment(options: StorageConfig) -> StorageConfig:
    """Fill an unset endpoint and region from this process's environment (the driver's, for a job)."""
    return options.model_copy(
        update={
            "endpoint_url": options.endpoint_url or _env(S3_ENDPOINT_ENV),
            "region": options.region or _env(S3_REGION_ENV),
        }
    )


def configure(options: StorageConfig) -> StorageConfig:
    """Set the object-store settings this process resolves URIs with; a job's driver calls it first."""
    global _active
    _active = with_environment(options)
    return _active


def active() -> StorageConfig:
    return _active or configure(StorageConfig())


def split_uri(location: str) -> tuple[str, str]:
    """(`scheme`, path inside the store) for a URI; ("", location) for a local path."""
    scheme, sep, rest = location.partition("://")
    if not sep or "/" in scheme:
        return "", location
    return scheme.lower(), rest


@functools.cache
def filesystem(scheme: str, options: StorageConfig, timeout_s: float | None = None) -> pafs.FileSystem:
    """One client per store and settings in each process: clients hold connection pools and credentials.

    With `timeout_s` (image fetches) the client gives up after that long and does not retry
    on its own: the caller retries with backoff, so that attempts and waits stay bounded and counted.
    """
    if scheme in S3_SCHEMES:
        kwargs: dict = {"anonymous": options.anonymous}
        if options.endpoint_url:
            kwargs["endpoint_override"] = options.endpoint_url
        if options.region:
            kwargs["region"] = options.region
        if timeout_s is not None:
            kwargs.update(
                connect_timeout=timeout_s,
                request_timeout=timeout_s,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
            )
        return pafs.S3FileSystem(**kwargs)
    if scheme in GCS_SCHEMES:
        limit = {"retry_time_limit": timedelta(seconds=max(1.0, timeout_s))} if timeout_s is not None else {}
        return pafs.GcsFileSystem(anonymous=options.anonymous, **limit)
    raise ValueError(f"unsupported storage scheme {scheme!r}")


def resolve(location: str, options: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or a URI."""
    scheme, rest = split_uri(location)
    if scheme in S3_SCHEMES + GCS_SCHEMES:
        return filesystem(scheme, options or active()), rest.rstrip("/")
    if scheme and scheme != "file":
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(rest if scheme else location)


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes_atomic(
    fs: pafs.FileSystem, path: str, data: bytes, before_publish: Callable[[], None] | None = None
) -> None:
    """A reader never sees a half-written file under its final name.

    Locally: a hidden temp file in the same folder, fsync, then rename over the target.
    Object stores publish an object only when its upload completes, so they write in place.
    `before_publish` runs as late as it can (before the rename; before the upload), so a check it
    makes (the writer's lease) still holds when the file appears; raising there publishes nothing.
    """
    parent = path.rsplit("/", 1)[0]
    if not is_local(fs):
        if before_publish is not None:
            before_publish()
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    fs.create_dir(parent, recursive=True)
    temp = join(parent, f"{schema.TEMP_PREFIX}{uuid.uuid4().hex}-{path.rsplit('/', 1)[1]}")
    try:
        with open(temp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if before_publish is not None:
            before_publish()
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def write_parquet_atomic(
    fs: pafs.FileSystem,
    path: str,
    table: pa.Table,
    before_publish: Callable[[], None] | None = None,
    **options: Any,
) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **({"compression": "zstd"} | options))
    write_bytes_atomic(fs, path, sink.getvalue().to_pybytes(), before_publish)


def list_files(
    fs: pafs.FileSystem, folder: str, suffixes: tuple[str, ...], skip: tuple[str, ...] = HIDDEN
) -> list[pafs.FileInfo]:
    """Files under a folder, at any depth, whose names end in one of `suffixes` (any case).

    Names under the folder that start with one of `skip` are not data, nor is anything below them.
    A path to a file is that file, whatever its name.
    """
    info = fs.get_file_info(folder)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [info]
    found = [
        entry
        for entry in fs.get_file_info(pafs.FileSelector(folder, recursive=True))
        if entry.type == pafs.FileType.File
        and entry.path.lower().endswith(suffixes)
        and not any(part.startswith(skip) for part in entry.path[len(folder) :].split("/") if part)
    ]
    return sorted(found, key=lambda entry: entry.path)


def list_folders(fs: pafs.FileSystem, folder: str) -> list[str]:
    """The folders directly under `folder`; none when it does not exist."""
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        return []
    return sorted(e.path for e in fs.get_file_info(pafs.FileSelector(folder)) if e.type == pafs.FileType.Directory)


def parquet_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    """Finished Parquet files under a folder; hidden and underscore files are not data."""
    return [entry.path for entry in list_files(fs, folder, (".parquet",))]


def expand(locations: list[str], suffixes: tuple[str, ...] = (".parquet",)) -> tuple[pafs.FileSystem, list[str]]:
    """Files behind a list of files, folders and globs; all on one filesystem."""
    filesystem: pafs.FileSystem | None = None
    files: list[str] = []
    for location in locations:
        fs, path = resolve(location)
        filesystem = filesystem or fs
        if type(fs) is not type(filesystem):
            raise ValueError(f"all inputs must be on one filesystem; {location} is not")
        if any(char in path for char in "*?["):
            parent = path[: min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
            files.extend(e.path for e in list_files(fs, parent, suffixes) if fnmatch.fnmatch(e.path, path))
        else:
            files.extend(e.path for e in list_files(fs, path, suffixes))
    if filesystem is None:
        raise ValueError("no input location given")
    return filesystem, sorted(dict.fromkeys(files))
