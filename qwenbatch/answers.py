"""JSON answers (`task.output: json`): the request added to the prompt, and the answer parsed and checked.

The answer is read as the model writes it: a Markdown code fence around it is stripped, then it must
parse as JSON and, with `task.json_schema`, validate against it. What passes goes to the `json` column,
normalised (keys sorted, no spaces, UTF-8 as is); a row whose answer fails gets `parse_error` with the
reason and keeps its raw `text`, so nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from qwenbatch import schema
from qwenbatch.config import TaskConfig
from qwenbatch.rows import RowError, column_or_nulls, error_message, with_columns

FENCE = re.compile(r"```[ \t]*(?:json[c5]?|JSON)?[ \t]*\r?\n?(.*?)\r?\n?[ \t]*```", re.DOTALL)


class ParseError(RowError):
    """An answer that is not JSON, or not JSON the schema accepts."""


def json_request(task: TaskConfig) -> str:
    """What the prompt asks for beyond the task's instruction, so the model knows the shape wanted."""
    if task.json_schema is None:
        return "Answer with JSON only."
    return "Answer with JSON only, following this JSON Schema:\n" + json.dumps(task.json_schema, ensure_ascii=False)


def strip_fences(text: str) -> str:
    """The JSON inside the first code fence (```json ... ```), or the text itself when there is none."""
    found = FENCE.search(text)
    return (found.group(1) if found else text).strip()


def normalised(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


@dataclass
class Answers:
    """Parses and validates answers with one compiled validator (built on first use: it is not picklable)."""

    json_schema: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._validator: Any = None

    @classmethod
    def of(cls, task: TaskConfig) -> Answers | None:
        return cls(task.json_schema) if task.output == "json" else None

    def parse(self, text: str, cut: bool = False) -> str:
        """The answer as normalised JSON; a ParseError naming why not. `cut`: it ended at max_new_tokens."""
        body = strip_fences(text)
        if not body:
            raise ParseError("the answer is empty" + (" (cut at generation.max_new_tokens)" if cut else ""))
        try:
            value = json.loads(body)
        except json.JSONDecodeError as exc:
            where = " (cut at generation.max_new_tokens)" if cut else ""
            raise ParseError(f"the answer is not valid JSON{where}: {exc}") from None
        if self.json_schema is not None:
            problem = self._problem(value)
            if problem is not None:
                raise ParseError(f"the answer does not match the schema: {problem}")
        return normalised(value)

    def _problem(self, value: Any) -> str | None:
        from jsonschema import validators
        from jsonschema.exceptions import best_match

        if self._validator is None:
            self._validator = validators.validator_for(self.json_schema)(self.json_schema)
        error = best_match(self._validator.iter_errors(value))
        if error is None:
            return None
        return f"at {error.json_path}: {error.message}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The `json` column for every ok row; `parse_error`, with the reason, for those whose answer fails."""
        texts = column_or_nulls(batch, schema.TEXT)
        finish = column_or_nulls(batch, schema.FINISH_REASON)
        statuses = column_or_nulls(batch, schema.STATUS)
        errors = column_or_nulls(batch, schema.ERROR)
        values: list[str | None] = [None] * batch.num_rows
        for index, status in enumerate(statuses):
            if status != schema.OK:
                continue
            try:
                values[index] = self.parse(texts[index] or "", cut=finish[index] == schema.FINISH_LENGTH)
            except ParseError as exc:
                statuses[index] = schema.PARSE_ERROR
                errors[index] = error_message(exc)
        return with_columns(
            batch,
            {
                schema.JSON: pa.array(values, pa.string()),
                schema.STATUS: pa.array(statuses, pa.string()),
                schema.ERROR: pa.array(errors, pa.string()),
            },
        )
