"""Read stage: the input's rows the output lacks, as a Ray dataset of blocks sized for the load stage.

Before any work the driver checks the input (`open_manifest`: files, columns, ids) and, once it knows
what the output holds, plans the reading: per file, the Parquet row groups (or the whole tar or Arrow
file) that hold rows left to do, with a mask of those rows. Row groups with nothing left are never
read, so a run's reading costs what it processes, not what is done. Ray tasks read the units and cut
them into blocks of a size that grows with the work (`block_rows`).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from qwenbatch import schema, storage
from qwenbatch.config import InputConfig
from qwenbatch.inputs import IdCheck, Manifest, ManifestError, Todo

ID_CHUNK_ROWS = 1 << 20  # ids hashed per chunk while checking a manifest
READ_TASK_ROWS = 1 << 20  # rows a read task covers at most: a file of many row groups is read by several
OPENERS = 16  # manifest footers read at once (many small reads, which object stores answer in parallel)


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
    columns = pads.dataset(files, filesystem=fs, format="parquet").schema.names
    if config.id_column not in columns:
        raise ManifestError(f"manifest has no id column {config.id_column!r} (columns: {', '.join(columns)})")
    if not {config.image_column, schema.IMAGE_BYTES, config.images_column} & set(columns):
        raise ManifestError(
            f"manifest has neither an image column {config.image_column!r} nor {schema.IMAGE_BYTES!r} "
            f"(nor an images list {config.images_column!r}) (columns: {', '.join(columns)})"
        )
    with ThreadPoolExecutor(OPENERS) as pool:
        footers = list(pool.map(lambda path: pq.read_metadata(path, filesystem=fs), files))
    groups = tuple(tuple(f.row_group(i).num_rows for i in range(f.num_row_groups)) for f in footers)
    recorded = [(f.metadata or {}).get(schema.MANIFEST_ROOT_KEY) for f in footers]
    roots = tuple(dict.fromkeys(root.decode() for root in recorded if root))
    check = IdCheck(config.id_column, sum(sum(g) for g in groups))
    for path in files:
        for batch in pq.ParquetFile(path, filesystem=fs).iter_batches(ID_CHUNK_ROWS, columns=[config.id_column]):
            check.add(batch.column(0))
    file_rows = tuple(sum(g) for g in groups)
    ids = check.finish(lambda rows: parquet_ids_at(fs, files, file_rows, config.id_column, rows))
    return Manifest(filesystem=fs, files=files, columns=columns, file_groups=groups, ids=ids, roots=roots)


def sample_locations(manifest: Manifest, config: InputConfig) -> list[str]:
    """The first locations of the first manifest file (`image`, or each of `images`): what a run checks against
    image.allowed_prefixes before it starts. None for tars and datasets, which hold their images' bytes."""
    if config.format != "parquet" or not manifest.files:
        return []
    names = [c for c in (config.image_column, config.images_column) if c in manifest.columns]
    if not names:
        return []
    file = pq.ParquetFile(manifest.files[0], filesystem=manifest.filesystem)
    batch = next(file.iter_batches(schema.LOCATION_SAMPLE_ROWS, columns=names), None)
    if batch is None:
        return []
    found: list[str] = []
    for column in batch.columns:
        for value in column.to_pylist():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and item:
                    found.append(item)
    return found


def parquet_ids_at(fs: Any, files: list[str], file_rows: tuple[int, ...], column: str, rows: np.ndarray) -> list:
    """The ids at some row numbers (counted across files): the examples of an error message."""
    starts = np.cumsum((0, *file_rows))
    found = []
    for row in rows.tolist():
        index = int(np.searchsorted(starts, row, side="right")) - 1
        table = pq.read_table(files[index], filesystem=fs, columns=[column])
        found.append(table.column(column)[row - int(starts[index])].as_py())
    return found


def block_rows(todo_rows: int, workers: int, max_pixels: int, window: int) -> int:
    """Rows per block: enough blocks for every worker to share the work and stream it, each as large as
    that allows (fewer tasks and objects per row), its decoded images under LOAD_BLOCK_BYTES, and a divisor
    of one infer window: a replica hands on its rows when it has done its block, so a block of one window
    sends each window's rows on to the writer as soon as they are done."""
    by_work = todo_rows // (schema.BLOCKS_PER_WORKER * max(1, workers))
    by_bytes = schema.LOAD_BLOCK_BYTES // (3 * max_pixels)
    wanted = max(schema.MIN_BLOCK_ROWS, min(schema.MAX_BLOCK_ROWS, by_work, by_bytes))
    # A divisor of the window, so blocks fill whole windows: a replica's call takes a window's rows, and
    # Ray Data passes what is over as a call of its own, a small batch that costs a GPU a whole pass.
    divisors = [rows for rows in range(1, window + 1) if window % rows == 0]
    at_most = max(rows for rows in divisors if rows <= wanted)
    least = min(window, schema.MIN_BLOCK_ROWS)
    return at_most if at_most >= least else min(rows for rows in divisors if rows >= least)


def _pack(mask: np.ndarray | None) -> bytes | None:
    return None if mask is None or mask.all() else np.packbits(mask).tobytes()


def read_units(manifest: Manifest, todo: Todo) -> list[dict[str, Any]]:
    """What the read tasks read: the row groups of Parquet files (a whole file of other kinds) that hold
    rows left to do, with a packed mask of those rows unless all of them are."""
    units = []
    for path, groups, keep in zip(manifest.files, manifest.file_groups, todo.keep, strict=True):
        start = 0
        for group, size in enumerate(groups):
            mask = None if keep is None else keep[start : start + size]
            if mask is None or mask.any():
                units.append({"file": path, "row_group": group, "rows": size, "keep": _pack(mask)})
            start += size
    return units


def read_manifest(
    manifest: Manifest, config: InputConfig, todo: Todo | None = None, rows_per_block: int = schema.MIN_BLOCK_ROWS
) -> Any:
    """The rows left to do (every row without `todo`) as a Ray dataset of `rows_per_block`-row blocks,
    streamed as they are read."""
    import ray.data

    todo = todo or Todo(rows=manifest.rows, keep=(None,) * len(manifest.files))
    units = read_units(manifest, todo)
    tasks = max(1, min(len(units), -(-todo.rows // READ_TASK_ROWS)))
    dataset = ray.data.from_items(units, override_num_blocks=tasks)
    rows = dataset.map_batches(
        read_unit_rows,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"filesystem": manifest.filesystem, "config": config, "columns": manifest.columns},
    )
    # Fused into the read tasks (which it is only with Ray's default task arguments, one CPU each):
    # each task yields blocks of this many rows as it reads them, which the load stage takes one by one.
    return rows.repartition(target_num_rows_per_block=rows_per_block)


def read_unit_rows(units: pa.Table, *, filesystem: Any, config: InputConfig, columns: list[str]) -> Iterator[pa.Table]:
    """The rows of each unit to do, in file order."""
    for unit in units.to_pylist():
        if config.format == "parquet":
            tables = parquet_rows(filesystem, unit["file"], unit["row_group"])
        else:
            from qwenbatch import sources

            tables = sources.file_rows(filesystem, unit["file"], config, columns)
        keep = None
        if unit["keep"] is not None:
            keep = np.unpackbits(np.frombuffer(unit["keep"], np.uint8), count=unit["rows"]).astype(bool)
        yield from kept(tables, keep)


def parquet_rows(filesystem: Any, path: str, row_group: int) -> Iterator[pa.Table]:
    for batch in pq.ParquetFile(path, filesystem=filesystem).iter_batches(row_groups=[row_group]):
        yield pa.Table.from_batches([batch])


def kept(tables: Iterator[pa.Table], keep: np.ndarray | None) -> Iterator[pa.Table]:
    """Tables in file order, minus the rows `keep` (a mask over all their rows, or None) leaves out."""
    offset = 0
    for table in tables:
        rows = table.num_rows
        if keep is not None:
            table = table.filter(pa.array(keep[offset : offset + rows]))
        offset += rows
        if table.num_rows:
            yield table
