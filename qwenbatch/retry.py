"""`qwenbatch run --retry-errors`: rows whose current row is an error are done again, and replace it exactly once.

Readers of an output (pandas, Spark, `ray.data.read_parquet`) list its folder's Parquet files, so a
retried row may never sit in two visible files at once. A retry run therefore

1. plans: from the shards' indexes, the shards holding error rows of the chosen statuses, and the
   manifest ids of those rows (a PDF page's error retries its whole document);
2. writes the new versions of those rows to `_retry/<run_id>/`, which readers skip (a leading `_`),
   while the run's other rows (a grown manifest's) go to the output as usual;
3. commits: writes `_journal.json` in that folder (the new rows are complete; these shards take
   them), then rewrites each of those shards in place with its old rows swapped for the new ones,
   under its own name (an atomic replace: a reader sees the old file or the new one), then its index;
   then removes the journal and the folder.

A run killed before the journal leaves the output as it was (the next run drops the folder); one
killed after it leaves a journal that the next run, of any kind, carries out first (`recover`):
swapping is idempotent, since the new rows replace whatever rows of their ids a shard holds.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from qwenbatch import schema, storage
from qwenbatch.config import ConfigError
from qwenbatch.documents import manifest_ids
from qwenbatch.ids import Hashes, IdSorter, SortedIds, hash_ids
from qwenbatch.shards import keyed, list_shards, read_stats, write_index, write_shard

log = logging.getLogger(__name__)

Renew = Callable[[], None] | None


def parse_statuses(text: str) -> tuple[str, ...]:
    """`--retry-errors` takes `all` or a comma-separated list of error statuses."""
    if text == "all":
        return schema.ERROR_STATUSES
    chosen = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [status for status in chosen if status not in schema.ERROR_STATUSES]
    if unknown or not chosen:
        raise ConfigError(
            f"--retry-errors: {', '.join(map(repr, unknown)) or 'nothing'} is not an error status; "
            f"give 'all' or some of {', '.join(schema.ERROR_STATUSES)}, comma-separated "
            "(e.g. --retry-errors=load_error)"
        )
    return chosen


@dataclass(frozen=True)
class KeySet:
    """Manifest ids as hashes, sorted: what `inputs.find_todo` does again although the output holds them."""

    hashes: Hashes

    @property
    def rows(self) -> int:
        return len(self.hashes)

    def sorted(self, bits: int) -> SortedIds:
        sorter = IdSorter(self.rows, split_bits=bits)
        sorter.add(self.hashes)
        return sorter.finish()


@dataclass(frozen=True)
class RetryPlan:
    """The error rows a retry run does again: their manifest ids, and the shards that hold them."""

    statuses: tuple[str, ...]
    keys: KeySet
    shards: tuple[str, ...]  # shard file names under the output
    rows: int  # error rows of those statuses in them

    def routes(self, batch: pa.Table, id_column: str) -> np.ndarray:
        """Which rows of a finished block are retried ones (to the retry folder), the others new ones."""
        if not self.keys.rows:
            return np.zeros(batch.num_rows, bool)
        return self.keys.hashes.contains(hash_ids(manifest_ids(batch, id_column)))


def error_rows(table: pa.Table, statuses: tuple[str, ...]) -> pa.Array:
    status = table.column(schema.STATUS) if schema.STATUS in table.column_names else pa.nulls(table.num_rows)
    return pc.fill_null(pc.is_in(status, pa.array(statuses, pa.string())), False)


def plan_retry(output: str, id_column: str, statuses: tuple[str, ...]) -> RetryPlan:
    """Reads only the shards whose index counts such errors, and of them only ids, statuses and pages."""
    fs, base = storage.resolve(output)
    shards = list_shards(fs, base)
    stats = read_stats(fs, shards, id_column)
    chosen = [shard for shard, item in zip(shards, stats, strict=True) if any(item["status"].get(s) for s in statuses)]
    keys, rows = [], 0
    for shard in chosen:
        table = _read(fs, shard.path, [id_column, schema.STATUS, schema.PAGE])
        failed = error_rows(table, statuses)
        rows += pc.sum(failed).as_py() or 0
        keys.append(hash_ids(pc.unique(pc.filter(manifest_ids(table, id_column), failed))))
    hashes = Hashes(*(np.concatenate([getattr(k, w) for k in keys]) for w in ("hi", "lo"))) if keys else Hashes.empty()
    names = tuple(shard.path.rsplit("/", 1)[-1] for shard in chosen)
    return RetryPlan(statuses, KeySet(hashes.sorted()), names, rows)


def staging(output: str, run_id: str) -> str:
    """Where a retry run writes its retried rows: hidden from readers until they are swapped in."""
    return storage.join(storage.join(output, schema.RETRY_DIR), run_id)


def reached(step: str) -> None:
    """Test hook: the tests kill a retry at each step (`QWENBATCH_TEST_KILL_AT`) to check exactly-once."""
    if os.environ.get(schema.TEST_KILL_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def commit(output: str, run_id: str, shards: tuple[str, ...], id_column: str, renew: Renew = None) -> int:
    """Swap a finished retry's rows in (steps 3 above); how many shards were rewritten."""
    fs, base = storage.resolve(output)
    folder = staging(base, run_id)
    reached("before-journal")
    journal = json.dumps({"run_id": run_id, "shards": list(shards)}).encode()
    storage.write_bytes_atomic(fs, storage.join(folder, schema.RETRY_JOURNAL), journal, renew)
    reached("journal")
    return _swap(fs, base, folder, shards, id_column, renew)


def recover(output: str, id_column: str, renew: Renew = None) -> int:
    """Before a run does anything: finish the retries killed after their journal, drop those killed before."""
    fs, base = storage.resolve(output)
    finished = 0
    for folder in storage.list_folders(fs, storage.join(base, schema.RETRY_DIR)):
        journal = storage.join(folder, schema.RETRY_JOURNAL)
        if storage.exists(fs, journal):
            with fs.open_input_stream(journal) as handle:
                shards = tuple(json.loads(handle.read())["shards"])
            log.warning("finishing the retry a killed run left in %s (%d shards)", folder, len(shards))
            _swap(fs, base, folder, shards, id_column, renew)
            finished += 1
        else:
            log.info("dropping the unfinished retry a killed run left in %s", folder)
            fs.delete_dir(folder)
    return finished


def _read(fs: pafs.FileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    file = pq.ParquetFile(path, filesystem=fs)
    names = file.schema_arrow.names
    return file.read(columns=[c for c in columns if c in names] if columns else None)


def _swap(fs: pafs.FileSystem, base: str, folder: str, shards: tuple[str, ...], id_column: str, renew: Renew) -> int:
    tables = [_read(fs, info.path) for info in storage.list_files(fs, folder, (".parquet",))]
    staged = pa.concat_tables(tables, promote_options="default") if tables else None
    rewritten = 0
    if staged is not None and staged.num_rows:
        staged_keys = hash_ids(manifest_ids(staged, id_column))
        staged_set = staged_keys.sorted()
        used = np.zeros(staged.num_rows, bool)
        for name in shards:
            path = storage.join(base, name)
            if not storage.exists(fs, path):
                continue
            table = _read(fs, path)
            keys = hash_ids(manifest_ids(table, id_column))
            replaced = staged_set.contains(keys)
            mine = keys.sorted().contains(staged_keys)
            used |= mine
            if replaced.any():
                table = pa.concat_tables(
                    [table.filter(pa.array(~replaced)), staged.filter(pa.array(mine))], promote_options="default"
                )
                storage.write_parquet_atomic(fs, path, table, renew)
                rewritten += 1
                reached("shard")
            write_index(fs, base, name, *keyed(table, id_column))
            reached("index")
        if not used.all():  # rows of no listed shard (never expected): written as new rows, never dropped
            write_shard(fs, base, staged.filter(pa.array(~used)), id_column, renew)
    journal = storage.join(folder, schema.RETRY_JOURNAL)
    if storage.exists(fs, journal):
        fs.delete_file(journal)  # every shard swapped: from here the folder is only what to delete
    reached("journal-removed")
    fs.delete_dir(folder)
    return rewritten
