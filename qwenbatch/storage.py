"""Filesystems for manifests and outputs: local paths and URIs, resolved in one place."""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or a URI."""
    if "://" in location and not location.startswith("file://"):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location.removeprefix("file://"))


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """A reader never sees a half-written file under its final name.

    Locally: a hidden temp file in the same folder, fsync, then rename over the target.
    Object stores publish an object only when its upload completes, so they write in place.
    """
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if not is_local(fs):
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    temp = join(parent, f".tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[1]}")
    try:
        with open(temp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def write_parquet_atomic(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes_atomic(fs, path, sink.getvalue().to_pybytes())


def parquet_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    """Finished Parquet files under a folder; hidden and underscore files are not data."""
    info = fs.get_file_info(folder)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [folder]
    selector = pafs.FileSelector(folder, recursive=True)
    return sorted(
        entry.path
        for entry in fs.get_file_info(selector)
        if entry.type == pafs.FileType.File
        and entry.path.endswith(".parquet")
        and not any(part.startswith((".", "_")) for part in entry.path[len(folder) :].split("/"))
    )


def expand(locations: list[str], suffix: str = ".parquet") -> tuple[pafs.FileSystem, list[str]]:
    """Files behind a list of files, folders and globs; all on one filesystem."""
    import fnmatch

    filesystem: pafs.FileSystem | None = None
    files: list[str] = []
    for location in locations:
        fs, path = resolve(location)
        filesystem = filesystem or fs
        if type(fs) is not type(filesystem):
            raise ValueError(f"all inputs must be on one filesystem; {location} is not")
        if any(char in path for char in "*?["):
            parent = path[: min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
            matches = [p for p in parquet_files(fs, parent) if fnmatch.fnmatch(p, path)]
            files.extend(p for p in matches if p.endswith(suffix))
        else:
            files.extend(p for p in parquet_files(fs, path) if p.endswith(suffix) or p == path)
    if filesystem is None:
        raise ValueError("no input location given")
    return filesystem, sorted(dict.fromkeys(files))
