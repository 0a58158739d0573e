"""Input kinds besides Parquet manifests: WebDataset tars and Hugging Face datasets.

Each kind has an opener, run on the driver before any work, that lists the ids without touching
image bytes and applies the manifest checks (ids present, non-null, unique), and a reader of one
file that gives the rows a manifest would, in the order the opener counted them: the encoded image
travels in `image_bytes` and is decoded, guarded and resized by the load stage, so a corrupt image
is its row's `load_error`, never a failed read.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from qwenbatch import schema, storage
from qwenbatch.config import InputConfig
from qwenbatch.inputs import IdCheck, Manifest, ManifestError
from qwenbatch.rows import with_columns

# A member name splits into sample key and suffix at the first dot of its base name: the
# WebDataset convention (`ray.data.read_webdataset` groups members the same way).
WEBDATASET_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
HF_IMAGE_BYTES, HF_IMAGE_PATH = "bytes", "path"  # the fields of a `datasets.Image()` column
SAMPLES_PER_TABLE = 256  # WebDataset rows gathered before they go on as one table


def open_input(config: InputConfig) -> Manifest:
    return open_webdataset(config) if config.format == "webdataset" else open_hf(config)


def file_rows(fs: pafs.FileSystem, path: str, config: InputConfig, columns: list[str]) -> Iterator[pa.Table]:
    """One input file's rows, in the order its opener counted them."""
    if config.format == "webdataset":
        return webdataset_rows(fs, path, config.id_column, columns)
    return hf_file_rows(path, config.image_column)


# --- WebDataset ----------------------------------------------------------------------------------


def open_webdataset(config: InputConfig) -> Manifest:
    """Sample keys (the ids) and text member names from the tar headers; image data is not read."""
    try:
        fs, files = storage.expand(config.paths(), suffixes=(".tar",))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"input.path: {exc}") from None
    if not files:
        raise ManifestError(f"input.path: no .tar file found at {config.path}")
    counts: list[tuple[int]] = []
    keys: list[str] = []
    suffixes: set[str] = set()
    for path in files:
        samples = tar_samples(fs, path)
        counts.append((len(samples),))
        for key, members in samples:
            keys.append(key)
            suffixes.update(members)
    every = pa.array(keys, pa.string())
    check = IdCheck("WebDataset key", len(every))
    check.add(every)
    ids = check.finish(lambda rows: every.take(pa.array(rows)).to_pylist())
    texts = sorted(s for s in suffixes if s.rsplit(".", 1)[-1].lower() in schema.WEBDATASET_TEXT_SUFFIXES)
    columns = [config.id_column, schema.IMAGE_BYTES, schema.SHARD, *texts]
    return Manifest(filesystem=fs, files=files, columns=columns, file_groups=tuple(counts), ids=ids)


def tar_samples(fs: pafs.FileSystem, path: str) -> list[tuple[str, set[str]]]:
    """(key, member suffixes) per sample, in tar order; a tar whose samples are not adjacent stops the job here."""
    samples: dict[str, set[str]] = {}
    previous = None
    for name, _ in _tar_members(fs, path, data=False):
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


def _tar_members(fs: pafs.FileSystem, path: str, data: bool) -> Iterator[tuple[str, bytes | None]]:
    """Regular files' names, and contents when `data`, in tar order: a local tar is read by seeking
    (headers only when no data is wanted), a remote one streamed once."""
    local = storage.is_local(fs)
    try:
        with fs.open_input_file(path) if local else fs.open_input_stream(path) as raw:
            with tarfile.open(fileobj=raw, mode="r:*" if local else "r|*") as tar:
                for member in tar:
                    if member.isreg():
                        content = tar.extractfile(member) if data else None
                        yield member.name, content.read() if content is not None else None
    except (tarfile.TarError, EOFError) as exc:
        raise ManifestError(f"{path}: not a readable tar archive: {exc}") from None


def webdataset_rows(fs: pafs.FileSystem, path: str, id_column: str, columns: list[str]) -> Iterator[pa.Table]:
    """A tar's samples as rows, in `tar_samples` order, every table with the manifest's columns and types."""
    texts = tuple(c for c in columns if c not in (id_column, schema.IMAGE_BYTES, schema.SHARD))
    target = pa.schema(
        [(id_column, pa.string()), (schema.IMAGE_BYTES, pa.binary()), (schema.SHARD, pa.string())]
        + [(name, pa.string()) for name in texts]
    )
    rows: list[dict[str, Any]] = []
    sample: dict[str, Any] = {}
    for name, content in _tar_members(fs, path, data=True):
        match = WEBDATASET_MEMBER.match(name)
        if not match:
            continue
        key, suffix = match.groups()
        if sample and sample["__key__"] != key:
            rows.append(webdataset_row(sample, id_column=id_column, texts=texts))
            sample = {}
            if len(rows) >= SAMPLES_PER_TABLE:
                yield pa.Table.from_pylist(rows, schema=target)
                rows = []
        sample = sample or {"__key__": key, "__url__": path}
        sample[suffix] = content
    if sample:
        rows.append(webdataset_row(sample, id_column=id_column, texts=texts))
    if rows:
        yield pa.Table.from_pylist(rows, schema=target)


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
    check = IdCheck(config.id_column, dataset.num_rows)
    counts: list[tuple[int]] = []
    for file in files:
        rows = 0
        for batch in _arrow_batches(file):
            check.add(batch.column(config.id_column))
            rows += batch.num_rows
        counts.append((rows,))
    every = dataset.data.column(config.id_column)
    ids = check.finish(lambda rows: pc.cast(every, pa.string()).take(pa.array(rows)).to_pylist())
    return Manifest(filesystem=pafs.LocalFileSystem(), files=files, columns=columns, file_groups=tuple(counts), ids=ids)


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


def _arrow_batches(file: str) -> Iterator[pa.RecordBatch]:
    with pa.OSFile(file) as source:
        yield from pa.ipc.open_stream(source)


def hf_file_rows(file: str, image_column: str) -> Iterator[pa.Table]:
    """One of the dataset's Arrow files, a record batch at a time, so no task holds it whole."""
    for batch in _arrow_batches(file):
        yield split_image(pa.Table.from_batches([batch]), image_column)


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
