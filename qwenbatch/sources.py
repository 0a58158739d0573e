"""Input kinds besides Parquet manifests: WebDataset tars and Hugging Face datasets.

Each kind has an opener, run on the driver before any work, that lists the ids without touching
image bytes and applies the manifest checks (ids present, non-null, unique), and a reader that
turns the input into the rows a manifest would give: the encoded image travels in `image_bytes`
and is decoded, guarded and resized by the load stage, so a corrupt image is its row's
`load_error`, never a failed read.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from qwenbatch import schema, storage
from qwenbatch.config import InputConfig
from qwenbatch.read import Manifest, ManifestError, check_ids
from qwenbatch.rows import with_columns

# A member name splits into sample key and suffix at the first dot of its base name: the
# WebDataset convention, and exactly how `ray.data.read_webdataset` groups members.
WEBDATASET_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
HF_IMAGE_BYTES, HF_IMAGE_PATH = "bytes", "path"  # the fields of a `datasets.Image()` column


def open_input(config: InputConfig) -> Manifest:
    return open_webdataset(config) if config.format == "webdataset" else open_hf(config)


def read_input(manifest: Manifest, config: InputConfig) -> Any:
    return read_webdataset(manifest, config) if config.format == "webdataset" else read_hf(manifest, config)


# --- WebDataset ----------------------------------------------------------------------------------


def open_webdataset(config: InputConfig) -> Manifest:
    """Sample keys (the ids) and text member names from the tar headers; image data is not read."""
    try:
        fs, files = storage.expand(config.paths(), suffixes=(".tar",))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"input.path: {exc}") from None
    if not files:
        raise ManifestError(f"input.path: no .tar file found at {config.path}")
    keys: list[str] = []
    suffixes: set[str] = set()
    for path in files:
        for key, members in tar_samples(fs, path):
            keys.append(key)
            suffixes.update(members)
    ids = pa.chunked_array([pa.array(keys, pa.string())], pa.string())
    check_ids(ids, "WebDataset key")
    texts = sorted(s for s in suffixes if s.rsplit(".", 1)[-1].lower() in schema.WEBDATASET_TEXT_SUFFIXES)
    columns = [config.id_column, schema.IMAGE_BYTES, schema.SHARD, *texts]
    return Manifest(filesystem=fs, files=files, ids=ids.combine_chunks(), columns=columns)


def tar_samples(fs: pafs.FileSystem, path: str) -> list[tuple[str, set[str]]]:
    """(key, member suffixes) per sample, in tar order; a tar that Ray would reject stops the job here."""
    samples: dict[str, set[str]] = {}
    previous = None
    for name in _tar_members(fs, path):
        match = WEBDATASET_MEMBER.match(name)
        if not match:
            continue
        key, suffix = match.groups()
        if key != previous and key in samples:
            raise ManifestError(
                f"{path}: the members of sample {key!r} are not adjacent; WebDataset needs each sample's "
                "files together (create the tar with `tar --sort=name`)"
            )
        if suffix in samples.setdefault(key, set()):
            raise ManifestError(f"{path}: {name} appears twice")
        samples[key].add(suffix)
        previous = key
    return list(samples.items())


def _tar_members(fs: pafs.FileSystem, path: str) -> Iterator[str]:
    """Regular file names from the headers: a local tar is read by seeking, a remote one streamed once."""
    local = storage.is_local(fs)
    try:
        with fs.open_input_file(path) if local else fs.open_input_stream(path) as raw:
            with tarfile.open(fileobj=raw, mode="r:*" if local else "r|*") as tar:
                yield from (member.name for member in tar if member.isreg())
    except (tarfile.TarError, EOFError) as exc:
        raise ManifestError(f"{path}: not a readable tar archive: {exc}") from None


def read_webdataset(manifest: Manifest, config: InputConfig) -> Any:
    import ray.data

    texts = tuple(c for c in manifest.columns if c not in (config.id_column, schema.IMAGE_BYTES, schema.SHARD))
    dataset = ray.data.read_webdataset(
        manifest.files,
        filesystem=manifest.filesystem,
        decoder=partial(webdataset_row, id_column=config.id_column, texts=texts),
    )
    target = pa.schema(
        [(config.id_column, pa.string()), (schema.IMAGE_BYTES, pa.binary()), (schema.SHARD, pa.string())]
        + [(name, pa.string()) for name in texts]
    )
    return dataset.map_batches(conform, batch_format="pyarrow", batch_size=None, fn_kwargs={"target": target})


def webdataset_row(sample: dict[str, Any], *, id_column: str, texts: tuple[str, ...]) -> dict[str, Any]:
    """One sample, one row: the first image member's raw bytes, text members as strings."""
    row: dict[str, Any] = {id_column: sample["__key__"], schema.SHARD: sample.get("__url__"), schema.IMAGE_BYTES: None}
    row.update(dict.fromkeys(texts))
    for suffix, value in sample.items():
        if suffix.startswith("__"):
            continue
        if row[schema.IMAGE_BYTES] is None and f".{suffix.rsplit('.', 1)[-1].lower()}" in schema.IMAGE_SUFFIXES:
            row[schema.IMAGE_BYTES] = value
        elif suffix in texts:
            row[suffix] = value.decode("utf-8", errors="replace")
    return row


def conform(batch: pa.Table, *, target: pa.Schema) -> pa.Table:
    """Every block the same columns and types, whichever members its samples happened to have."""
    present = set(batch.column_names)
    columns = [batch.column(f.name).cast(f.type) if f.name in present else pa.nulls(len(batch), f.type) for f in target]
    return pa.Table.from_arrays(columns, schema=target)


# --- Hugging Face datasets -----------------------------------------------------------------------


def open_hf(config: InputConfig) -> Manifest:
    """Load the dataset on the driver (memory-mapped) and check its ids; workers then read its Arrow files."""
    dataset = _load_hf(config)
    columns = list(dataset.column_names)
    for key, column in (("id", config.id_column), ("image", config.image_column)):
        if column not in columns:
            raise ManifestError(
                f"dataset has no {key} column {column!r} (columns: {', '.join(columns)}); "
                f"add one before saving it, or set input.{key}_column"
            )
    files = [entry["filename"] for entry in dataset.cache_files]
    if not files:
        raise ManifestError("the dataset lives in memory only; save it with save_to_disk and read that folder")
    ids = dataset.data.column(config.id_column)
    check_ids(ids, config.id_column)
    return Manifest(
        filesystem=pafs.LocalFileSystem(), files=files, ids=pc.cast(ids, pa.string()).combine_chunks(), columns=columns
    )


def _load_hf(config: InputConfig) -> Any:
    import datasets

    paths = config.paths()
    if any(storage.split_uri(p)[0] not in ("", "file") for p in paths):
        raise ManifestError("input.path: format hf reads a dataset on a local or shared disk, not a URI")
    try:
        if config.hf_builder:
            where = {"data_dir": paths[0]} if len(paths) == 1 and Path(paths[0]).is_dir() else {"data_files": paths}
            return datasets.load_dataset(config.hf_builder, split=config.hf_split, **where)
        if len(paths) != 1:
            raise ManifestError("input.path: a save_to_disk dataset is one folder")
        loaded = datasets.load_from_disk(paths[0])
    except (OSError, ValueError, KeyError) as exc:
        raise ManifestError(f"input.path: cannot load the dataset: {' '.join(str(exc).split())}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if config.hf_split not in loaded:
            raise ManifestError(f"input.hf_split: no split {config.hf_split!r} (splits: {', '.join(loaded)})")
        loaded = loaded[config.hf_split]
    return loaded


def read_hf(manifest: Manifest, config: InputConfig) -> Any:
    import ray.data

    files = ray.data.from_items([{"file": f} for f in manifest.files], override_num_blocks=len(manifest.files))
    return files.map_batches(
        hf_file_rows, batch_size=1, batch_format="pyarrow", fn_kwargs={"image_column": config.image_column}
    )


def hf_file_rows(batch: pa.Table, *, image_column: str) -> Iterator[pa.Table]:
    """Stream one of the dataset's Arrow files a record batch at a time, so no task holds it whole."""
    for file in batch.column("file").to_pylist():
        with pa.OSFile(file) as source:
            for record_batch in pa.ipc.open_stream(source):
                yield split_image(pa.Table.from_batches([record_batch]), image_column)


def split_image(table: pa.Table, image_column: str) -> pa.Table:
    """A `datasets.Image()` column becomes its path (kept as the image location) and `image_bytes`."""
    column = table.column(image_column)
    if pa.types.is_struct(column.type):
        data, location = pc.struct_field(column, HF_IMAGE_BYTES), pc.struct_field(column, HF_IMAGE_PATH)
    elif pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        data, location = column, pa.nulls(len(table), pa.string())
    else:
        return table  # a path or URI: the load stage fetches it
    return with_columns(table, {image_column: location, schema.IMAGE_BYTES: data})
