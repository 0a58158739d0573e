"""Pure helpers on Arrow batches shared by the stages: every stage adds columns, none drops rows."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from qwenbatch import schema


def column_or_nulls(batch: pa.Table, name: str) -> list[Any]:
    """A column as Python values, or all None when the batch lacks it."""
    if name in batch.column_names:
        return batch.column(name).to_pylist()
    return [None] * batch.num_rows


def with_columns(batch: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """Set columns, replacing any of the same name in place and appending the rest."""
    for name, values in columns.items():
        if name in batch.column_names:
            batch = batch.set_column(batch.column_names.index(name), name, values)
        else:
            batch = batch.append_column(name, values)
    return batch


def error_message(exc: BaseException) -> str:
    """One line, bounded: what a user reads in the `error` column and the summary."""
    text = str(exc).strip() or type(exc).__name__
    if not isinstance(exc, _OWN_ERRORS):
        text = f"{type(exc).__name__}: {text}"
    text = " ".join(text.split())
    return text if len(text) <= schema.MAX_ERROR_CHARS else text[: schema.MAX_ERROR_CHARS - 1] + "…"


class RowError(Exception):
    """Base of the stage errors whose message is already written for the user."""


_OWN_ERRORS: tuple[type[BaseException], ...] = (RowError,)


def ok_mask(batch: pa.Table) -> list[bool]:
    return [status == schema.OK for status in column_or_nulls(batch, schema.STATUS)]
