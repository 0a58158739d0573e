"""What a person sees: `qwenbatch run` in a pseudo-terminal (one bar) and without one (a line every N s),
Ray's chatter gone unless --verbose, and at the end the output, the summary and the report command."""

from __future__ import annotations

import argparse
import io
import logging
import os
import pty
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from qwenbatch import schema
from qwenbatch.console import ConsoleHandler, Progress, report_command
from qwenbatch.write import inputs_in
from tests.helpers import REPO, job_data, write_images, write_manifest

ROWS = 6
RAY_NOISE = ("Running Dataset", "logging_progress", "Token authentication", "Starting execution", "Loading weights")


def statuses(*values: str) -> pa.Table:
    return pa.table({schema.STATUS: pa.array(values, pa.string())})


def test_progress_numbers_and_lines():
    out = io.StringIO()
    progress = Progress(out, every_s=0.05, bar=False)
    progress.start(4)
    time.sleep(0.2)
    assert "0/4 rows (0%), - rows/s, ETA -, ok 0, errors 0" in out.getvalue()
    assert "(starting the load actors and model replicas)" in out.getvalue()
    progress.add(statuses(schema.OK, schema.LOAD_ERROR, schema.OK))
    progress.add(statuses(schema.INFER_ERROR))
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and all(line.startswith("progress: ") for line in lines)
    assert re.fullmatch(
        r"progress: 4/4 rows \(100%\), [0-9.]+ rows/s, ETA 0:00:00, ok 2, errors 2, 0:00:\d\d elapsed", lines[-1]
    )


def test_progress_counts_a_pdfs_pages_as_its_one_manifest_row():
    """Rows done are manifest rows, as the total is: a 3-page PDF is one of them when its pages are written;
    ok and errors count the rows written (pages), with JSON answers already parsed."""
    out = io.StringIO()
    progress = Progress(out, every_s=60, bar=False)
    progress.start(2)
    pages = pa.table(
        {
            schema.STATUS: pa.array([schema.OK, schema.PARSE_ERROR, schema.OK], pa.string()),
            schema.DOCUMENT_ROWS: pa.array([3, 3, 3], pa.int32()),
        }
    )
    progress.add(finalized := pages.drop_columns([schema.DOCUMENT_ROWS]), inputs_in(pages))
    assert finalized.num_rows == 3 and progress.numbers().startswith("1/2 rows (50%), ")
    image = pa.table({schema.STATUS: [schema.OK], schema.DOCUMENT_ROWS: pa.array([None], pa.int32())})
    progress.add(image, inputs_in(image))
    progress.close()
    assert re.fullmatch(
        r"progress: 2/2 rows \(100%\), [0-9.]+ rows/s, ETA 0:00:00, ok 3, errors 1, 0:00:\d\d elapsed",
        out.getvalue().splitlines()[-1],
    )


def test_progress_bar_keeps_log_lines_above_it():
    out = io.StringIO()
    progress = Progress(out, bar=True)
    handler = ConsoleHandler(out)
    logger = logging.getLogger("qwenbatch.test_console")
    logger.addHandler(handler)
    try:
        progress.start(2)
        progress.add(statuses(schema.OK))
        logger.warning("a real warning")
        progress.close()
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    before, _, after = text.partition("a real warning\n")
    assert before.startswith("\r[........................] 0/2 rows (0%)") and "\n" not in before
    assert before.endswith("\r\x1b[K"), "the bar's line is wiped, not ended, for the log line"
    assert after.startswith("\r[############............] 1/2 rows (50%)"), "and the bar drawn again below it"
    assert text.endswith("\x1b[K\n") and Progress.active is None


def test_report_command():
    assert report_command("/data/out/caption/") == "qwenbatch report /data/out/caption/ --out caption-report.html"
    assert report_command("s3://b/my out") == "qwenbatch report 's3://b/my out' --out 'my out-report.html'"


def test_every_argument_has_help():
    from qwenbatch.cli import parser

    [commands] = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    silent = [
        f"{name} {action.dest}"
        for name, command in commands.choices.items()
        for action in command._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]
    assert silent == []


def test_help_says_what_it_is_and_shows_examples():
    done = subprocess.run(
        [sys.executable, "-m", "qwenbatch.cli", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stderr == ""
    text = done.stdout
    assert "thin over the library calls" not in text  # the module's docstring is for its readers
    assert "Batch Qwen3-VL over image collections on Ray" in text and "exactly one output row" in text
    for example in (
        "qwenbatch demo --dir demo_out",
        "qwenbatch manifest /data/photos /data/photos/manifest.parquet",
        "qwenbatch run configs/caption.yaml input.path=/data/photos/manifest.parquet output.path=/data/captions",
        "qwenbatch status /data/captions",
        "qwenbatch report /data/captions --out captions-report.html",
    ):
        assert f"\n  {example}\n" in text  # each on a line of its own, as written
    assert text.index("examples:") > text.index("options:")  # the epilog, after the commands


@pytest.fixture(scope="module")
def job(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("console")
    paths = write_images(folder / "images", ROWS)
    rows = [{"id": f"r{i}", "image": str(path)} for i, path in enumerate(paths)]
    rows.append({"id": "missing", "image": str(folder / "images" / "gone.jpg")})
    manifest = write_manifest(folder / "manifest.parquet", rows)
    config = folder / "job.yaml"
    config.write_text(yaml.safe_dump(job_data(tiny_model, manifest, folder / "out")))
    return config


def run_cli(job: Path, tmp_path: Path, *options: str, terminal: bool = False) -> tuple[int, str]:
    """`qwenbatch run` as a user starts it, its stdout and stderr together; in a pseudo-terminal if told."""
    command = [sys.executable, "-m", "qwenbatch.cli", "run", str(job), f"output.path={tmp_path / 'out'}", *options]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HF_HUB_DISABLE"))}
    ray_dir = tempfile.mkdtemp(prefix="qb-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env |= {"PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_dir}
    try:
        return _run(command, env, terminal)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def _run(command: list[str], env: dict[str, str], terminal: bool) -> tuple[int, str]:
    if not terminal:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        return done.returncode, done.stdout + done.stderr
    leader, follower = pty.openpty()
    process = subprocess.Popen(command, env=env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.wait(timeout=600), b"".join(chunks).decode(errors="replace")


def check_end(text: str, out: Path) -> None:
    """The summary says where the output is, what it holds, and the exact command for its report."""
    assert f"succeeded: {out}\n" in text.replace("\r\n", "\n")
    assert f"rows {ROWS + 1}  ok {ROWS}  errors 1" in text
    assert "1 x file not found" in text
    assert f"  report: {report_command(str(out))}" in text


def test_without_a_terminal_a_line_every_interval(job, tmp_path):
    code, text = run_cli(job, tmp_path, "--progress-every", "1")
    assert code == 0, text
    lines = [line for line in text.splitlines() if line.startswith("progress: ")]
    assert len(lines) >= 3, text
    assert lines[-1].startswith(f"progress: {ROWS + 1}/{ROWS + 1} rows (100%), ")
    assert lines[-1].endswith("elapsed") and f"ok {ROWS}, errors 1" in lines[-1]
    assert "\r" not in text and "\x1b[" not in text, "no bar without a terminal"
    for noise in RAY_NOISE:
        assert noise not in text, noise
    check_end(text, tmp_path / "out")
    report = subprocess.run(  # the printed command, word for word, works
        [sys.executable, "-m", "qwenbatch.cli", *shlex.split(report_command(str(tmp_path / "out")))[1:]],
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0 and (tmp_path / "out-report.html").stat().st_size > 0, report.stderr


def test_in_a_terminal_one_bar(job, tmp_path):
    code, text = run_cli(job, tmp_path, terminal=True)
    assert code == 0, text
    frames = re.findall(r"\r\[[#.]{24}\] (\d+)/(\d+) rows", text)
    assert len(frames) >= 3 and frames[-1] == (str(ROWS + 1), str(ROWS + 1)), text
    assert "rows/s, ETA" in text and f"ok {ROWS}, errors 1" in text
    assert "progress: " not in text, "no periodic lines in a terminal"
    for noise in (*RAY_NOISE, "Running 0:", "- MapBatches(Loader)"):  # nor Ray Data's own bars
        assert noise not in text, noise
    check_end(text, tmp_path / "out")


def test_verbose_keeps_rays_operator_table(job, tmp_path):
    code, text = run_cli(job, tmp_path, "--verbose", "--progress-every", "5")
    assert code == 0, text
    assert "Running Dataset" in text and "MapBatches(Loader)" in text, text
    assert "progress: " in text
    check_end(text, tmp_path / "out")


def test_the_replicas_and_import_qwenbatch_keep_ray_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """`process` on a Ray the user's own `read_*` started: the replicas get the quiet environment through their
    runtime env (workers started before `quiet_ray` lack it), and `import qwenbatch` mutes Ray's token notice."""
    import qwenbatch
    from qwenbatch.config import ProcessConfig
    from qwenbatch.console import QUIET_ENV
    from qwenbatch.pipeline import Placement, build_stages

    assert logging.getLogger(qwenbatch.RAY_AUTH_NOTICE).level == logging.ERROR
    config = ProcessConfig.model_validate({"model": {"name": "any/model"}})
    placement = Placement("cpu", 0)
    for name in QUIET_ENV:
        monkeypatch.delenv(name, raising=False)
    assert build_stages(config, placement, "run")[-1].env == {}  # verbose: Ray's bars as they are
    for name, value in QUIET_ENV.items():
        monkeypatch.setenv(name, value)
    stages = {stage.name: stage for stage in build_stages(config, placement, "run")}
    assert stages["infer"].env == QUIET_ENV
