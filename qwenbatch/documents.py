"""Exactly-once for documents that become several rows: a PDF's pages are written together, in one shard.

Resume compares the manifest's ids with the ids the output holds, and a PDF row's id is the document's
(`inv-7`) while its output rows are its pages (`inv-7#p1`, `inv-7#p2`, ...). So the writer holds a
document's page rows until all of them have come (`DocumentGate`) and writes them in one shard, and
that shard's index lists the document's id beside its pages' (`resume_keys`): a document is done exactly
when every one of its rows is written. A run killed before that shard lands wrote none of its pages, and
the next run does the whole document again; one killed after has nothing left to do for it.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from qwenbatch import schema
from qwenbatch.rows import column_or_nulls

log = logging.getLogger(__name__)


class DocumentGate:
    """Passes rows on at once, except a document's page rows, which it passes on together once all have come."""

    def __init__(self) -> None:
        self.held: dict[str, list[pa.Table]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)

    def admit(self, batch: pa.Table) -> pa.Table:
        """The rows ready to write: every row of no document, and every row of the documents now whole."""
        if schema.DOCUMENT not in batch.column_names or batch.column(schema.DOCUMENT).null_count == batch.num_rows:
            return batch
        documents = column_or_nulls(batch, schema.DOCUMENT)
        expected = column_or_nulls(batch, schema.DOCUMENT_ROWS)
        rows_of: dict[str, list[int]] = defaultdict(list)
        for index, document in enumerate(documents):
            if document is not None:
                rows_of[document].append(index)
        parts = [batch.filter(pc.is_null(batch.column(schema.DOCUMENT)))]
        for document, rows in rows_of.items():
            self.held[document].append(batch.take(pa.array(rows, pa.int64())))
            self.counts[document] += len(rows)
            if self.counts[document] >= expected[rows[0]]:
                parts.extend(self.held.pop(document))
                del self.counts[document]
        return pa.concat_tables([part for part in parts if part.num_rows] or [batch.slice(0, 0)])

    @property
    def held_rows(self) -> int:
        return sum(self.counts.values())

    def drop_held(self) -> None:
        """At the end of a run: rows of documents that never became whole are not written (the next run does
        their documents again); a run that finished every row holds none."""
        if self.counts:
            log.warning(
                "%d rows of %d unfinished documents not written: the next run does those documents again",
                self.held_rows,
                len(self.counts),
            )
        self.held.clear()
        self.counts.clear()


def resume_keys(table: pa.Table, id_column: str) -> tuple[pa.Array, int]:
    """The ids resume matches the manifest's against: every row's id, and each PDF document's own id once.

    Read from the written columns (a page row's id is `<document>#p<page>`), so a shard's index is the same
    whether written with the shard or rebuilt from it. Also how many manifest rows the table finishes.
    """
    ids = pc.cast(table.column(id_column), pa.string()).combine_chunks()
    if schema.PAGE not in table.column_names:
        return ids, table.num_rows
    pages = table.column(schema.PAGE).combine_chunks()
    is_page = pc.is_valid(pages)
    page_rows = pc.sum(is_page).as_py() or 0
    if not page_rows:
        return ids, table.num_rows
    documents = set()
    for row_id, page in zip(pc.filter(ids, is_page).to_pylist(), pc.filter(pages, is_page).to_pylist(), strict=True):
        suffix = f"{schema.PAGE_ID_SEPARATOR}{page}"
        if row_id.endswith(suffix):  # a manifest's own `page` column on other rows is not ours
            documents.add(row_id[: -len(suffix)])
        else:
            page_rows -= 1
    keys = pa.concat_arrays([ids, pa.array(sorted(documents), pa.string())])
    return keys, table.num_rows - page_rows + len(documents)


def manifest_ids(table: pa.Table, id_column: str) -> pa.Array:
    """Each row's manifest id: a page row's is its document's, before and after the writer finalizes it.

    Before: the `_document` column says it. After (a written shard): a page row's id is `<document>#p<page>`.
    """
    ids = pc.cast(table.column(id_column), pa.string()).combine_chunks()
    if schema.DOCUMENT in table.column_names:
        return pc.coalesce(pc.cast(table.column(schema.DOCUMENT), pa.string()).combine_chunks(), ids)
    if schema.PAGE not in table.column_names or table.column(schema.PAGE).null_count == table.num_rows:
        return ids
    values = ids.to_pylist()
    for row, page in enumerate(table.column(schema.PAGE).to_pylist()):
        suffix = f"{schema.PAGE_ID_SEPARATOR}{page}"
        if page is not None and values[row].endswith(suffix):
            values[row] = values[row][: -len(suffix)]
    return pa.array(values, pa.string())
