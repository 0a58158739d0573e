"""Read stage: manifests into a Ray dataset, checked before any work, minus rows already done."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from qwenbatch import schema, storage
from qwenbatch.config import InputConfig


class ManifestError(ValueError):
    """The manifest as a whole cannot be processed: a job-level error before any work."""


@dataclass(frozen=True)
class Manifest:
    filesystem: object
    files: list[str]
    ids: pa.Array
    columns: list[str]

    @property
    def rows(self) -> int:
        return len(self.ids)

    def count_new(self, done: pa.Array) -> int:
        """Rows of this manifest that the output does not hold yet."""
        return int(pc.sum(pc.invert(pc.is_in(self.ids, value_set=done))).as_py() or 0)


def open_manifest(config: InputConfig) -> Manifest:
    """Find the input and check it and its ids before any work; cheap, it reads ids, never images.

    Ids key resume and exactly-once output, so null, empty or repeated ids stop the job here.
    """
    if config.format != "parquet":
        from qwenbatch import sources  # WebDataset tars, Hugging Face datasets

        return sources.open_input(config)
    return open_parquet(config)


def open_parquet(config: InputConfig) -> Manifest:
    """Find the manifest files and check their schema and ids, reading only the id column."""
    try:
        fs, files = storage.expand(config.paths())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"input.path: {exc}") from None
    if not files:
        raise ManifestError(f"input.path: no Parquet manifest found at {config.path}")
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    columns = dataset.schema.names
    if config.id_column not in columns:
        raise ManifestError(f"manifest has no id column {config.id_column!r} (columns: {', '.join(columns)})")
    if config.image_column not in columns and schema.IMAGE_BYTES not in columns:
        raise ManifestError(
            f"manifest has neither an image column {config.image_column!r} nor {schema.IMAGE_BYTES!r} "
            f"(columns: {', '.join(columns)})"
        )
    ids = dataset.to_table(columns=[config.id_column]).column(config.id_column)
    check_ids(ids, config.id_column)
    return Manifest(filesystem=fs, files=files, ids=pc.cast(ids, pa.string()).combine_chunks(), columns=columns)


def check_ids(ids: pa.ChunkedArray, column: str) -> None:
    missing = ids.null_count
    as_text = pc.cast(ids, pa.string())
    empty = pc.sum(pc.equal(pc.utf8_trim_whitespace(as_text), "")).as_py() or 0
    if missing or empty:
        raise ManifestError(f"{missing + empty} rows have a null or empty {column!r}; every row needs a unique id")
    counts = pc.value_counts(as_text)
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(repeated):
        examples = ", ".join(repr(v) for v in repeated.field("values")[:5].to_pylist())
        raise ManifestError(f"{len(repeated)} ids appear more than once in {column!r}, e.g. {examples}")


def read_manifest(manifest: Manifest, config: InputConfig):
    """The input as a Ray dataset of manifest-like rows, one per image."""
    if config.format != "parquet":
        from qwenbatch import sources

        return sources.read_input(manifest, config)
    import ray.data

    return ray.data.read_parquet(manifest.files, filesystem=manifest.filesystem)


def skip_done(batch: pa.Table, *, id_column: str, done_holder: list) -> pa.Table:
    """Drop rows whose ids the output already holds (resume, incremental runs)."""
    import ray

    done = ray.get(done_holder[0])
    keep = pc.invert(pc.is_in(pc.cast(batch.column(id_column), pa.string()), value_set=done))
    return batch.filter(keep)
