"""Prompt stage (CPU): the task's instruction for each row, rendered with the model's chat template."""

from __future__ import annotations

import string
from typing import Any

import pyarrow as pa

from qwenbatch import schema
from qwenbatch.answers import json_request
from qwenbatch.config import TaskConfig
from qwenbatch.loaded import image_count
from qwenbatch.rows import RowError, column_or_nulls, error_message, ok_mask, with_columns


class PromptError(RowError):
    """A row whose prompt cannot be built: no question, a template column missing or null."""


def template_fields(template: str) -> list[str]:
    """The `{column}` names a custom template refers to."""
    fields = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if not name or any(char in name for char in ".[]"):
            raise ValueError(f"template field {{{name}}} must be a plain column name")
        fields.append(name)
    return fields


def columns_needed(task: TaskConfig) -> list[str]:
    if task.kind == "vqa":
        return [task.question_column]
    if task.kind == "custom":
        return template_fields(task.prompt or "")
    return [task.prompt_column]


def instruction_for(task: TaskConfig, row: dict[str, Any]) -> str:
    """The user text for one row, with the JSON request when the task wants JSON."""
    text = task_instruction(task, row)
    return f"{text}\n\n{json_request(task)}" if task.output == "json" else text


def task_instruction(task: TaskConfig, row: dict[str, Any]) -> str:
    """The task's own text for one row; pure, so every task's rule is testable without a model."""
    if task.kind == "vqa":
        question = row.get(task.question_column)
        if question is None or not str(question).strip():
            raise PromptError(f"vqa row has no question in column {task.question_column!r}")
        return str(question).strip()
    if task.kind == "custom":
        values = {}
        for name in template_fields(task.prompt or ""):
            if name not in row:
                raise PromptError(f"template needs column {name!r}, which the manifest lacks")
            if row[name] is None:
                raise PromptError(f"template column {name!r} is null in this row")
            values[name] = row[name]
        return (task.prompt or "").format_map(values)
    own = row.get(task.prompt_column)
    if own is not None and str(own).strip():
        return str(own).strip()
    instruction = task.instruction()
    assert instruction is not None  # caption and document have defaults
    return instruction


def chat_messages(task: TaskConfig, text: str, images: int = 1) -> list[dict[str, Any]]:
    """The conversation: the row's images, in order, then its text."""
    messages: list[dict[str, Any]] = []
    if task.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": task.system}]})
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
    messages.append({"role": "user", "content": content})
    return messages


def prompt_batch(batch: pa.Table, *, model: str, revision: str | None, task: TaskConfig) -> pa.Table:
    """Add the chat text for every loaded row; a row without a usable prompt gets `prompt_error`."""
    from qwenbatch.hub import load_processor

    processor = load_processor(model, revision)
    needed = columns_needed(task)
    present = [name for name in needed if name in batch.column_names]
    rows = batch.select(present).to_pylist() if present else [{} for _ in range(batch.num_rows)]
    chats: list[str | None] = []
    statuses = column_or_nulls(batch, schema.STATUS)
    errors = column_or_nulls(batch, schema.ERROR)
    sizes = column_or_nulls(batch, schema.SIZES)
    rendered: dict[tuple[str, int], str] = {}  # rows alike (a caption job: all of them) share one render
    for index, (row, ok) in enumerate(zip(rows, ok_mask(batch), strict=True)):
        if not ok:
            chats.append(None)
            continue
        try:
            key = (instruction_for(task, row), image_count(sizes[index]))
            if key not in rendered:
                messages = chat_messages(task, *key)
                rendered[key] = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            chats.append(rendered[key])
        except Exception as exc:  # noqa: BLE001 - a bad row is that row's error
            chats.append(None)
            statuses[index] = schema.PROMPT_ERROR
            errors[index] = error_message(exc)
    return with_columns(
        batch,
        {
            schema.CHAT: pa.array(chats, pa.string()),
            schema.STATUS: pa.array(statuses, pa.string()),
            schema.ERROR: pa.array(errors, pa.string()),
        },
    )
