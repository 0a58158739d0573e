"""JSON answers: fences stripped, parsed, validated against a JSON Schema, normalised; a failing answer is a
`parse_error` row that keeps its text. End to end with a tiny model scripted to answer `{"total":12}`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from qwenbatch import schema
from qwenbatch.answers import Answers, ParseError, strip_fences
from qwenbatch.config import ConfigError, TaskConfig, load_config
from qwenbatch.pipeline import run
from qwenbatch.prompt import instruction_for
from qwenbatch.write import finalize_batch
from tests.helpers import job_config, job_data, read_output, write_images, write_manifest

SCRIPTED = '{"total":12}'
INVOICE = {
    "type": "object",
    "properties": {"vendor": {"type": "string"}, "total": {"type": "number"}, "items": {"type": "array"}},
    "required": ["vendor", "total"],
}


@pytest.fixture(scope="module")
def json_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qwenbatch.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "json", answer=SCRIPTED)


@pytest.mark.parametrize(
    ("text", "body"),
    [
        ('```json\n{"a": 1}\n```', '{"a": 1}'),
        ("Here it is:\n```\n[1, 2]\n```\nDone.", "[1, 2]"),
        ('```JSON {"a": 1} ```', '{"a": 1}'),
        ('  {"a": 1}  ', '{"a": 1}'),
    ],
)
def test_fences_are_stripped(text: str, body: str) -> None:
    assert strip_fences(text) == body


def test_answers_parse_validate_and_normalise() -> None:
    plain, invoice = Answers(), Answers(INVOICE)
    assert plain.parse('```json\n{"b": [1, 2.5], "a": "é"}\n```') == '{"a":"é","b":[1,2.5]}'
    assert (
        invoice.parse('{"total": 12.5, "vendor": "ACME", "items": []}') == '{"items":[],"total":12.5,"vendor":"ACME"}'
    )
    cases = [
        (plain, "", "the answer is empty", False),
        (plain, "The total is 12.", "the answer is not valid JSON: Expecting value: line 1 column 1 (char 0)", False),
        (plain, '{"total": 1', "the answer is not valid JSON (cut at generation.max_new_tokens): Expecting", True),
        (
            invoice,
            '{"vendor": "ACME"}',
            "the answer does not match the schema: at $: 'total' is a required property",
            0,
        ),
        (invoice, '{"vendor": "A", "total": "12"}', "the answer does not match the schema: at $.total: '12' is not", 0),
        (invoice, "[1]", "the answer does not match the schema: at $: [1] is not of type 'object'", False),
    ]
    for answers, text, reason, cut in cases:
        with pytest.raises(ParseError) as caught:
            answers.parse(text, cut=bool(cut))
        assert str(caught.value).startswith(reason), (text, str(caught.value))


def test_parse_errors_keep_their_text_in_the_written_rows() -> None:
    batch = pa.table(
        {
            "id": ["ok", "bad", "cut", "failed"],
            schema.TEXT: ['{"vendor": "ACME", "total": 3}', "no JSON here", '{"vendor": "AC', None],
            schema.STATUS: [schema.OK, schema.OK, schema.OK, schema.LOAD_ERROR],
            schema.ERROR: [None, None, None, "file not found"],
            schema.FINISH_REASON: [schema.FINISH_STOP, schema.FINISH_STOP, schema.FINISH_LENGTH, None],
        }
    )
    rows = finalize_batch(batch, model="m", task="document", run_id="r", answers=Answers(INVOICE)).to_pylist()
    assert [row[schema.STATUS] for row in rows] == [schema.OK, schema.PARSE_ERROR, schema.PARSE_ERROR, "load_error"]
    assert [row[schema.JSON] for row in rows] == ['{"total":3,"vendor":"ACME"}', None, None, None]
    assert [row[schema.TEXT] for row in rows] == batch.column(schema.TEXT).to_pylist()  # the raw answer stays
    assert rows[1][schema.ERROR].startswith("the answer is not valid JSON: Expecting value")
    assert rows[2][schema.ERROR].startswith("the answer is not valid JSON (cut at generation.max_new_tokens)")
    assert rows[3][schema.ERROR] == "file not found"


def test_schema_inline_or_from_a_file_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "invoice.schema.json"
    path.write_text(json.dumps(INVOICE))
    assert TaskConfig(output="json", json_schema=str(path)).json_schema == INVOICE
    assert TaskConfig(output="json", json_schema=INVOICE).json_schema == INVOICE
    job = tmp_path / "job.yaml"
    for task, message in (
        ({"output": "json", "json_schema": {"type": "objekt"}}, "task.json_schema: not a valid JSON Schema: "),
        ({"output": "json", "json_schema": str(tmp_path / "none.json")}, "task.json_schema: cannot read the schema"),
        ({"json_schema": INVOICE}, "task: task.json_schema needs task.output 'json'"),
        ({"output": "yaml"}, "task.output: Input should be 'text' or 'json'"),
    ):
        job.write_text(json.dumps(job_data(tmp_path, tmp_path, tmp_path / "out", task=task)))
        with pytest.raises(ConfigError, match="^" + str(job).replace(".", r"\.") + ": " + message.replace("(", r"\(")):
            load_config(job)


def test_the_prompt_asks_for_json() -> None:
    task = TaskConfig(kind="document", prompt="Extract the invoice.", output="json", json_schema=INVOICE)
    assert instruction_for(task, {}) == (
        "Extract the invoice.\n\nAnswer with JSON only, following this JSON Schema:\n" + json.dumps(INVOICE)
    )
    assert instruction_for(TaskConfig(output="json"), {}).endswith("\n\nAnswer with JSON only.")
    assert instruction_for(TaskConfig(), {}) == schema.DEFAULT_PROMPTS["caption"]


def test_json_answers_through_the_pipeline(tmp_path: Path, json_model: Path, ray_local) -> None:
    paths = write_images(tmp_path / "images", 6, sizes=[(64, 64), (96, 64)])
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": p.stem, "image": str(p)} for p in paths])
    number = {"type": "object", "properties": {"total": {"type": "integer"}}, "required": ["total"]}
    task = {"kind": "document", "output": "json", "json_schema": number}
    config = job_config(json_model, manifest, tmp_path / "ok", task=task, generation={"max_new_tokens": 16})
    assert run(config).succeeded
    rows = read_output(tmp_path / "ok").to_pylist()
    assert len(rows) == 6
    for row in rows:
        assert (row[schema.STATUS], row[schema.TEXT], row[schema.JSON]) == (schema.OK, SCRIPTED, SCRIPTED)

    # The same answer against a schema it misses, and cut short: parse_error rows, each with its raw text.
    wrong = task | {"json_schema": INVOICE}
    config = job_config(json_model, manifest, tmp_path / "bad", task=wrong, generation={"max_new_tokens": 16})
    result = run(config, max_error_rate=0.5)
    assert result.summary["state"] == "failed" and result.summary["output"]["status"] == {schema.PARSE_ERROR: 6}
    for row in read_output(tmp_path / "bad").to_pylist():
        assert (row[schema.STATUS], row[schema.TEXT], row[schema.JSON]) == (schema.PARSE_ERROR, SCRIPTED, None)
        assert row[schema.ERROR] == "the answer does not match the schema: at $: 'vendor' is a required property"
    config = job_config(json_model, manifest, tmp_path / "cut", task=task, generation={"max_new_tokens": 3})
    run(config)
    for row in read_output(tmp_path / "cut").to_pylist():
        assert (row[schema.STATUS], row[schema.TEXT]) == (schema.PARSE_ERROR, '{"total":')
        assert row[schema.ERROR].startswith("the answer is not valid JSON (cut at generation.max_new_tokens)")
