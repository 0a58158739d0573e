"""What a replica returns, for either engine: a row's answer or its error, decoded as transformers does.

`infer.Generator` and `engine_vllm.VllmGenerator` both answer a block through `guarded_results`,
publish their busy time through `publish_timing` and build the same columns with `results_table`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from qwenbatch import schema
from qwenbatch.attempts import Guard
from qwenbatch.rows import RowError, column_or_nulls, error_message, ok_mask, with_columns
from qwenbatch.timing import ReplicaClock, TimingSink

__all__ = [
    "InferError",
    "Output",
    "decode_answer",
    "guarded_results",
    "opens_thinking",
    "publish_timing",
    "results_table",
    "split_reasoning",
]

log = logging.getLogger(__name__)

THINK_END = "</think>"
THINK_START = "<think>"


class InferError(RowError):
    """A row that failed in `generate` even alone; carries only the message, never the tensors."""


@dataclass(frozen=True)
class Output:
    text: str
    reasoning: str | None
    input_tokens: int
    output_tokens: int
    finish_reason: str


def split_reasoning(decoded: str, thinking: bool = False) -> tuple[str, str | None]:
    """Thinking variants write `reasoning</think>answer`: return (answer, reasoning).

    `thinking`: the prompt opened `<think>` (Thinking variants' generation prompt), so the output starts
    inside the reasoning. Such an output without `</think>` (cut by max_new_tokens) has no answer yet:
    ("", the reasoning so far); so has one that opens `<think>` itself.
    """
    if THINK_END in decoded:
        reasoning, _, answer = decoded.partition(THINK_END)
        return answer.strip(), reasoning.replace(THINK_START, "").strip()
    if thinking or decoded.lstrip().startswith(THINK_START):
        return "", decoded.replace(THINK_START, "").strip()
    return decoded.strip(), None


def opens_thinking(processor: Any) -> bool:
    """True if the model's chat template ends its generation prompt in `<think>`, as Thinking variants do."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "?"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt.rstrip().endswith(THINK_START)


def decode_answer(tokenizer: Any, ids: list[int], thinking: bool) -> tuple[str, str | None]:
    """(text, reasoning) of one row's generated ids, decoded exactly as transformers does.

    A length cut can split a character that spans several tokens (an emoji, a rare CJK character);
    the text then ends in U+FFFD, as in a plain `decode`, so it equals transformers' answer.
    """
    return split_reasoning(tokenizer.decode(ids, skip_special_tokens=True), thinking)


def guarded_results(
    batch: pa.Table,
    id_column: str,
    clock: ReplicaClock,
    guard: Guard,
    generate_rows: Callable[[pa.Table, list[int]], dict[int, Output | InferError]],
) -> dict[int, Output | InferError]:
    """A replica's answers for a block's loaded rows, under its poison-row guard; both engines' one path."""
    rows = [index for index, ok in enumerate(ok_mask(batch)) if ok]
    ids = column_or_nulls(batch, id_column)
    clock.call_started(len(rows))
    return guard.run(
        rows,
        [str(ids[i]) for i in rows],
        lambda picked: generate_rows(batch, picked),
        died=lambda: InferError(schema.WORKER_DIED_TWICE),
    )


def publish_timing(clock: ReplicaClock, timing: TimingSink | None) -> None:
    """End the block's timing and publish the figures; a failure to write them never fails rows."""
    figures = clock.call_ended()
    if timing is None:
        return
    try:
        timing.publish(figures)
    except OSError as exc:
        log.warning("could not write replica timing to %s: %s", timing.folder, exc)


def results_table(batch: pa.Table, results: dict[int, Output | InferError]) -> pa.Table:
    """The block with each row's answer or error (rows not in `results` keep theirs); internal columns dropped.

    Shared by both engines, so they write the same columns.
    """
    n = batch.num_rows
    text, reasoning, input_tokens, output_tokens, finish = ([None] * n for _ in range(5))
    statuses = column_or_nulls(batch, schema.STATUS)
    errors = column_or_nulls(batch, schema.ERROR)
    for index, result in results.items():
        if isinstance(result, InferError):
            statuses[index] = schema.INFER_ERROR
            errors[index] = error_message(result)
            continue
        text[index] = result.text
        reasoning[index] = result.reasoning
        input_tokens[index] = result.input_tokens
        output_tokens[index] = result.output_tokens
        finish[index] = result.finish_reason
    batch = batch.drop_columns([c for c in (schema.PIXELS, schema.CHAT) if c in batch.column_names])
    return with_columns(
        batch,
        {
            schema.TEXT: pa.array(text, pa.string()),
            schema.REASONING: pa.array(reasoning, pa.string()),
            schema.STATUS: pa.array(statuses, pa.string()),
            schema.ERROR: pa.array(errors, pa.string()),
            schema.INPUT_TOKENS: pa.array(input_tokens, pa.int32()),
            schema.OUTPUT_TOKENS: pa.array(output_tokens, pa.int32()),
            schema.FINISH_REASON: pa.array(finish, pa.string()),
        },
    )
