"""The HTML report, read the way people read it: in a real headless Chromium, on real outputs.

A demo run (real Ray, the tiny model, one truncated image), partial outputs cut from it, the same
output on an S3 server (moto), and a synthetic 100,000-row output for size and build time.
Set QWENBATCH_SCREENSHOT=docs/report.png to refresh the screenshot in docs/status-and-report.md from the demo run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from qwenbatch import cli, demo, pipeline, report, schema, storage
from qwenbatch.config import StorageConfig
from qwenbatch.report_svg import display_text
from qwenbatch.status import duration_text, read_status
from qwenbatch.summary import summarize_output
from tests.helpers import encode, moto_s3, noise_image, read_output

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT_WIDTH, SCREENSHOT_HEIGHT = 1280, 1900
SCREENSHOT_MAX_BYTES = 300_000


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, ray_local: Any) -> Path:
    """The demo's caption run: 48 images, one of them truncated (one load_error row)."""
    folder = tmp_path_factory.mktemp("demo")
    shutil.copytree(tiny_model, folder / "model")  # prepare() finds a complete checkpoint and keeps it
    result = pipeline.run(demo.demo_config(demo.prepare(folder), "caption"))
    assert result.succeeded, result.summary
    return Path(result.output)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright. Missing is a failure, not a skip: .ci/run installs it."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (as .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


class Page:
    """A report opened in Chromium, recording console errors, page errors and any request it makes."""

    def __init__(self, browser: Any, path: Path) -> None:
        self.page = browser.new_page(viewport={"width": SCREENSHOT_WIDTH, "height": SCREENSHOT_HEIGHT})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(path.as_uri())
        self.url = path.as_uri()

    def numbers(self) -> dict[str, str]:
        """Each tagged number's exact value: its text, or the data-value beside a text rounded for people."""
        return self.page.eval_on_selector_all(
            "[data-key]", "els => Object.fromEntries(els.map(e => [e.dataset.key, e.dataset.value ?? e.textContent]))"
        )

    def shown(self) -> dict[str, str]:
        """Each tagged number as people read it."""
        return self.page.eval_on_selector_all(
            "[data-key]", "els => Object.fromEntries(els.map(e => [e.dataset.key, e.textContent]))"
        )

    def cards(self) -> list[dict[str, Any]]:
        return self.page.eval_on_selector_all(
            "#sheet .card",
            """cards => cards.map(c => ({
                id: c.querySelector('.id').textContent,
                status: c.dataset.status,
                visible: c.offsetParent !== null,
                thumb: !!c.querySelector('img.thumb'),
                decoded: !!c.querySelector('img.thumb') && c.querySelector('img.thumb').naturalWidth > 0,
                placeholder: !!c.querySelector('.ph'),
                text: c.querySelector('.text') ? c.querySelector('.text').innerText : null,
                question: c.querySelector('.q') ? c.querySelector('.q').innerText : null,
                error: c.querySelector('.err') ? c.querySelector('.err').innerText : null,
            }))""",
        )

    def show(self, status: str) -> list[dict[str, Any]]:
        """Click a status filter; the cards still visible."""
        self.page.click(f'#filters button[data-filter="{status}"]')
        visible = [c for c in self.cards() if c["visible"]]
        assert self.page.inner_text("#shown") == str(len(visible))
        return visible

    def assert_clean(self) -> None:
        assert self.errors == []
        assert [u for u in self.requests if u != self.url] == [], "the report fetched something"


def summary_value(summary: dict[str, Any], key: str) -> Any:
    value: Any = summary
    for part in key.split("."):
        value = value[part]
    return value


def assert_numbers(page: Page, expected: dict[str, Any], required: set[str]) -> None:
    """Every number tagged with a summary path shows exactly the value at that path."""
    shown = page.numbers()
    assert required <= shown.keys()
    for key, text in shown.items():
        value = summary_value(expected, key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            assert text == str(value), key
        else:
            assert type(value)(text.replace(",", "")) == value, key


def words(text: str | None) -> str:
    return " ".join((text or "").split())


def write_screenshot(page: Page, path: Path) -> None:
    """The top of the page (summary, plots, the start of the contact sheet), as a small palette PNG."""
    page.page.screenshot(path=str(path))
    image = Image.open(path).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    image.save(path, optimize=True)


def test_demo_report_in_chromium(demo_output: Path, browser: Any, tmp_path: Path) -> None:
    html_path = tmp_path / "report.html"
    report.write_report(str(demo_output), str(html_path))
    page = Page(browser, html_path)
    page.assert_clean()

    summary = json.loads((demo_output / schema.SUMMARY_FILE).read_text())
    assert_numbers(
        page,
        summary,
        {
            "run_id",
            "gpu_busy",
            "output.rows",
            "output.status.ok",
            "output.status.load_error",
            "output.input_tokens",
            "output.output_tokens",
            "error_rate",
            "duration_s",
            "this_run.rows",
            "this_run.images_per_s",
            "this_run.output_tokens_per_s",
        },
    )
    assert page.page.inner_text("#state") == "succeeded"
    shown = page.shown()
    assert shown["error_rate"] == "2.1%" and summary["error_rate"] == round(1 / 48, 6)  # the truncated image
    assert re.fullmatch(r"\d+ s|\d+ min \d\d s", shown["duration_s"]), shown["duration_s"]
    assert shown["duration_s"] == duration_text(summary["duration_s"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", shown["started"]), shown["started"]
    assert shown["started"] == f"{datetime.fromisoformat(summary['started']):%Y-%m-%d %H:%M:%S} UTC"
    assert shown["gpu_busy"] == f"{summary['gpu_busy']:.1%}"
    busy = page.page.inner_text("#busy")  # the demo's replica ran on the CPU: no GPU to keep busy, no advice on one
    assert busy.startswith("Replica busy: ") and "GPU" not in busy

    rows = {r[schema.ID]: r for r in read_output(demo_output).to_pylist()}
    cards = page.cards()
    assert sorted(c["id"] for c in cards) == sorted(rows)  # 48 rows: under the sample, all shown
    ok = [c for c in cards if c["status"] == schema.OK]
    failed = [c for c in cards if c["status"] != schema.OK]
    assert len(ok) == 47 and all(c["thumb"] and c["decoded"] for c in ok)
    assert len(failed) == 1 and failed[0]["placeholder"] and not failed[0]["thumb"]  # the truncated file
    assert failed[0]["error"] == rows[failed[0]["id"]][schema.ERROR]
    for card in ok:
        assert words(card["text"]) == words(display_text(rows[card["id"]][schema.TEXT]))

    assert [c["id"] for c in page.show(schema.LOAD_ERROR)] == [failed[0]["id"]]
    assert len(page.show(schema.OK)) == 47
    assert len(page.show("all")) == 48
    page.assert_clean()

    page.page.evaluate("window.scrollTo(0, 0)")
    shot = tmp_path / "report.png"
    write_screenshot(page, shot)
    assert Image.open(shot).size == (SCREENSHOT_WIDTH, SCREENSHOT_HEIGHT)
    assert shot.stat().st_size < SCREENSHOT_MAX_BYTES
    if os.environ.get("QWENBATCH_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["QWENBATCH_SCREENSHOT"])


@pytest.mark.parametrize(
    ("summary_kind", "expected_state"), [("no summary", "running"), ("partial summary", "partial")]
)
def test_partial_run_report(
    demo_output: Path, browser: Any, tmp_path: Path, summary_kind: str, expected_state: str
) -> None:
    """A run that stopped after writing some shards: every count comes from what the shards hold."""
    table = read_output(demo_output).sort_by(schema.ID)
    output = tmp_path / "output"
    output.mkdir()
    pq.write_table(table.slice(0, 20), output / "part-a.parquet")
    pq.write_table(table.slice(40), output / "part-b.parquet")  # holds the truncated image's row
    totals = summarize_output(str(output))
    error_rate = round((totals["rows"] - totals["status"][schema.OK]) / totals["rows"], 6)  # as build_summary has it
    if summary_kind == "partial summary":
        summary = json.loads((demo_output / schema.SUMMARY_FILE).read_text())
        summary |= {"state": "partial", "output": totals, "error_rate": error_rate}
        (output / schema.SUMMARY_FILE).write_text(json.dumps(summary))

    html_path = tmp_path / "report.html"
    report.write_report(str(output), str(html_path))
    page = Page(browser, html_path)
    page.assert_clean()
    assert page.page.inner_text("#state") == read_status(str(output)).state == expected_state
    required = {"output.rows", "output.status.ok", "output.status.load_error", "output.output_tokens"}
    if summary_kind == "no summary":
        assert_numbers(page, {"output": totals, "error_rate": error_rate}, required | {"error_rate"})
        assert "No _summary.json" in page.page.inner_text("#summary")
    else:
        assert_numbers(page, summary, required | {"error_rate", "run_id", "duration_s", "this_run.images_per_s"})
    cards = page.cards()
    assert len(cards) == totals["rows"] == 28
    assert sum(c["status"] != schema.OK for c in cards) == totals["rows"] - totals["status"][schema.OK] == 1
    assert all(c["decoded"] for c in cards if c["status"] == schema.OK)

    first = report.gather(str(output), sample=5, failed=0, seed=1).cards
    again = report.gather(str(output), sample=5, failed=0, seed=1).cards
    other = report.gather(str(output), sample=5, failed=0, seed=2).cards
    ids = [[c.row[schema.ID] for c in cards] for cards in (first, again, other)]
    assert len(ids[0]) == 5 and ids[0] == ids[1] and ids[0] != ids[2]  # seeded: same output, same sample


def test_gpu_replicas_get_gpu_busy_and_its_advice(demo_output: Path, tmp_path: Path) -> None:
    """The demo's output with its replica's device set to cuda, as a GPU run records it."""
    output = Path(shutil.copytree(demo_output, tmp_path / "output"))
    summary = json.loads((output / schema.SUMMARY_FILE).read_text())
    for replica in summary["replicas"]["each"]:
        assert replica["device"] == "cpu"
        replica["device"] = "cuda"
    (output / schema.SUMMARY_FILE).write_text(json.dumps(summary))
    page = report.build_report(str(output), sample=0, failed=0)
    assert f"<h3>GPU busy: {summary['gpu_busy']:.1%}</h3>" in page and "add CPUs per GPU" in page
    assert "Replica busy" not in page


def test_report_from_s3(demo_output: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Output, images and the report itself on an S3 server (moto), through `qwenbatch report`."""
    import boto3

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    with moto_s3("runs") as endpoint:
        try:
            s3 = boto3.client("s3", endpoint_url=endpoint)
            table = read_output(demo_output)
            local = table.column(schema.IMAGE).to_pylist()
            uris = [f"s3://runs/images/{Path(p).name}" for p in local]
            for path, uri in zip(local, uris, strict=True):
                s3.upload_file(path, "runs", uri.removeprefix("s3://runs/"))
            table = table.set_column(table.schema.get_field_index(schema.IMAGE), schema.IMAGE, pa.array(uris))
            pq.write_table(table, tmp_path / "part-0.parquet")
            s3.upload_file(str(tmp_path / "part-0.parquet"), "runs", "out/part-0.parquet")
            summary = json.loads((demo_output / schema.SUMMARY_FILE).read_text())
            summary["config"]["storage"]["endpoint_url"] = endpoint  # as a job on that store records it
            s3.put_object(Bucket="runs", Key=f"out/{schema.SUMMARY_FILE}", Body=json.dumps(summary).encode())
            s3.put_object(Bucket="runs", Key=f"out/{schema.SUCCESS_FILE}", Body=b"")

            assert (
                cli.main(
                    ["report", "s3://runs/out", "--out", "s3://runs/reports/demo.html", "--endpoint-url", endpoint]
                )
                == 0
            )
            stored = s3.get_object(Bucket="runs", Key="reports/demo.html")["Body"].read()
            assert stored.count(b'class="thumb"') == 47 and stored.count(b'class="ph"') == 1
            facts = report.gather("s3://runs/out")
            assert facts.state == "succeeded" and facts.rows == 48
            assert facts.status == {schema.OK: 47, schema.LOAD_ERROR: 1}
            assert len(facts.timeline) == 2  # the run's start and its one shard, timed by the object's mtime
        finally:
            storage.configure(StorageConfig())


SCALE_ROWS = 100_000
SCALE_SHARDS = 100
SCALE_IMAGES = 300
SCALE_IMAGE_SIZES = [(320, 240), (240, 320), (400, 400)]


def synthetic_output(folder: Path) -> tuple[Path, pa.Table, set[str]]:
    """A vqa output of 100,000 rows in 100 shards from two runs, reusing a few hundred real images.

    Returns the output folder, its rows, and the image locations that cannot make a thumbnail.
    """
    rng = np.random.default_rng(7)
    (folder / "images").mkdir()
    images = []
    for index in range(SCALE_IMAGES):  # larger than a thumbnail, so every thumbnail is a full-size one
        path = folder / "images" / f"img_{index:04d}.jpg"
        path.write_bytes(encode(noise_image(*SCALE_IMAGE_SIZES[index % len(SCALE_IMAGE_SIZES)], seed=index), "JPEG"))
        images.append(str(path))
    broken = folder / "images" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    unreadable = {str(broken), str(folder / "images" / "missing.jpg")}
    locations = np.array(images + sorted(unreadable), dtype=object)
    index = np.arange(SCALE_ROWS)
    draw = rng.random(SCALE_ROWS)
    status = np.where(draw < 0.97, schema.OK, np.where(draw < 0.99, schema.LOAD_ERROR, schema.INFER_ERROR))
    ok = status == schema.OK
    error = np.where(
        status == schema.LOAD_ERROR,
        np.char.add("file not found: /data/incoming/", index.astype(str)),
        np.where(
            status == schema.INFER_ERROR,
            np.char.add("CUDA out of memory. Tried to allocate ", (index % 900 + 100).astype(str)),
            None,
        ),
    )
    image_tokens = rng.integers(64, 1281, SCALE_ROWS)
    output_tokens = rng.integers(5, 129, SCALE_ROWS)
    table = pa.table(
        {
            schema.ID: [f"r{i:06d}" for i in index],
            schema.IMAGE: locations[rng.integers(0, len(locations), SCALE_ROWS)],
            schema.QUESTION: np.array(demo.QUESTIONS, dtype=object)[index % len(demo.QUESTIONS)],
            schema.TEXT: pa.array(
                np.where(ok, np.char.add("A synthetic answer number ", index.astype(str)), None), pa.string()
            ),
            schema.REASONING: pa.nulls(SCALE_ROWS, pa.string()),
            schema.STATUS: status.astype(object),
            schema.ERROR: pa.array(error, pa.string()),
            schema.WIDTH: pa.array(np.where(ok, 448, None), pa.int32()),
            schema.HEIGHT: pa.array(np.where(ok, 320, None), pa.int32()),
            schema.IMAGE_TOKENS: pa.array(np.where(ok, image_tokens, None), pa.int32()),
            schema.INPUT_TOKENS: pa.array(np.where(ok, image_tokens + 20, None), pa.int32()),
            schema.OUTPUT_TOKENS: pa.array(np.where(ok, output_tokens, None), pa.int32()),
            schema.FINISH_REASON: pa.array(
                np.where(ok, np.where(output_tokens == 128, schema.FINISH_LENGTH, schema.FINISH_STOP), None),
                pa.string(),
            ),
            schema.MODEL: ["Qwen/Qwen3-VL-8B-Instruct"] * SCALE_ROWS,
            schema.TASK: ["vqa"] * SCALE_ROWS,
            schema.RUN_ID: np.where(index < 40_000, "run-a", "run-b").astype(object),
        }
    )
    output = folder / "output"
    output.mkdir()
    started = time.time() - 7200
    per_shard = SCALE_ROWS // SCALE_SHARDS
    for shard in range(SCALE_SHARDS):
        path = output / f"part-{shard:05d}.parquet"
        pq.write_table(table.slice(shard * per_shard, per_shard), path)
        written = started + (shard * 30 if shard < 40 else 3600 + (shard - 40) * 20)  # run-b resumes an hour later
        os.utime(path, (written, written))
    totals = summarize_output(str(output))
    summary = {
        "run_id": "run-b",
        "state": "succeeded",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(started + 3590)),
        "duration_s": 1210.0,
        "manifest_rows": SCALE_ROWS,
        "skipped_done": 40_000,
        "this_run": {"rows": 60_000, "shards": 60, "images_per_s": 49.587, "output_tokens_per_s": 3322.314},
        "output": totals,
        "error_rate": round(1 - totals["status"][schema.OK] / SCALE_ROWS, 6),
        "config": {"task": {"kind": "vqa"}, "model": {"name": "Qwen/Qwen3-VL-8B-Instruct"}},
        "versions": {"qwenbatch": "test"},
    }
    (output / schema.SUMMARY_FILE).write_text(json.dumps(summary))
    (output / schema.SUCCESS_FILE).touch()
    return output, table, unreadable


def test_report_of_100k_rows(browser: Any, tmp_path: Path) -> None:
    output, table, unreadable = synthetic_output(tmp_path)
    started = time.perf_counter()
    size = report.write_report(str(output), str(tmp_path / "report.html"))
    elapsed = time.perf_counter() - started
    print(f"\nreport of {SCALE_ROWS:,} rows in {SCALE_SHARDS} shards: built in {elapsed:.2f} s, {size / 1e6:.2f} MB")
    assert size < 5_000_000

    page = Page(browser, tmp_path / "report.html")
    page.assert_clean()
    shown = page.shown()
    assert shown["duration_s"] == "20 min 10 s" and page.numbers()["duration_s"] == "1210.0"
    assert shown["error_rate"] == f"{1 - table.column(schema.STATUS).to_pylist().count(schema.OK) / SCALE_ROWS:.1%}"
    cards = page.cards()
    ok = [c for c in cards if c["status"] == schema.OK]
    assert len(ok) == report.DEFAULT_SAMPLE and len(cards) - len(ok) == report.DEFAULT_FAILED
    location = dict(zip(table.column(schema.ID).to_pylist(), table.column(schema.IMAGE).to_pylist(), strict=True))
    for card in cards:  # not loaded by the job, missing or broken: a placeholder; every other one a thumbnail
        readable = card["status"] != schema.LOAD_ERROR and location[card["id"]] not in unreadable
        assert card["decoded"] == readable == (not card["placeholder"]), card["id"]
    assert any(c["status"] == schema.OK and c["placeholder"] for c in cards)  # a missing or broken file was drawn
    question = dict(zip(table.column(schema.ID).to_pylist(), table.column(schema.QUESTION).to_pylist(), strict=True))
    assert all(c["question"] == f"Q: {question[c['id']]}" for c in cards)
    assert len(page.show(schema.INFER_ERROR)) + len(page.show(schema.LOAD_ERROR)) == report.DEFAULT_FAILED

    reasons = page.page.eval_on_selector_all("#reasons tr td:nth-child(2)", "tds => tds.map(t => t.textContent)")
    load_errors = sum(s == schema.LOAD_ERROR for s in table.column(schema.STATUS).to_pylist())
    assert "file not found: …" in reasons  # 2,000 distinct messages, one reason
    row = page.page.locator("#reasons tr", has_text="file not found: …")
    assert row.locator("td").first.inner_text() == f"{load_errors:,}"
    throughput = page.page.locator("figure", has_text="Throughput")
    assert "run-b" in throughput.inner_text() and throughput.locator("circle").count() == 61  # start + 60 shards
