"""What a person sees while a job runs: one progress bar (or a line every 30 s), and Ray kept quiet.

In a terminal the run is one bar: rows done of the total, rows/s, ETA, ok and error counts. Without
one (a log file, CI) the same numbers come as one line every `every_s` seconds. Ray's harmless
chatter is turned off where it starts, by Ray's own settings and logger levels, never by filtering
the output, so real warnings still show; `--verbose` leaves Ray as it is, operator table included.
"""

from __future__ import annotations

import io
import logging
import os
import shlex
import sys
import threading
import time
from typing import ClassVar, TextIO

import pyarrow as pa

from qwenbatch import RAY_AUTH_NOTICE, schema

BAR_REFRESH_S = 0.5
BAR_WIDTH = 24
DEFAULT_EVERY_S = 30.0
# Ray Data logs that it was asked for no progress bars, and Ray that token authentication is on (the
# default for a local cluster): both say what qwenbatch chose, so these two loggers show errors only.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
QUIET_LOGGERS = ("ray.data._internal.progress", RAY_AUTH_NOTICE)


def quiet_ray(verbose: bool = False) -> None:
    """Before Ray starts: no operator table, no execution banners, no weight-loading bars in the workers.

    Not silenced: Ray core's one ERROR line that an actor "has constructor arguments in the object
    store" (Ray Data passes every actor pool's function that way, ray-project/ray#57733). Its only
    switch, RAY_BACKEND_LOG_LEVEL=fatal, prints a line of its own and would hide Ray core's real errors.
    """
    if verbose:
        return
    for name, value in QUIET_ENV.items():  # "Loading weights" bars: of the workers of a local Ray started
        os.environ.setdefault(name, value)  # after this, and of the replicas (`pipeline.build_stages`) on any
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # our bar replaces its bars and, without a terminal, its operator table
    context.print_on_execution_start = False
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:  # its console handler; its log file keeps INFO
        if handler.get_name() == "console":
            handler.setLevel(logging.WARNING)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts the rows a run finishes and shows them: a bar in a terminal, else a line every `every_s`."""

    active: ClassVar[Progress | None] = None  # the bar on screen, which log lines must not write over

    def __init__(self, stream: TextIO | None = None, every_s: float = DEFAULT_EVERY_S, bar: bool | None = None):
        self.stream = stream or sys.stderr
        self.bar = self.stream.isatty() if bar is None else bar
        self.every_s = BAR_REFRESH_S if self.bar else every_s
        self.lock = threading.RLock()
        self.total = self.ok = self.outputs = 0
        self.done = 0.0  # manifest rows finished: a PDF's page rows count a share of their document each
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, total: int) -> None:
        with self.lock:
            self.total, self.started = total, time.monotonic()
        if self.bar:
            Progress.active = self
        self.draw()
        self._thread = threading.Thread(target=self._tick, name="qwenbatch-progress", daemon=True)
        self._thread.start()

    def add(self, batch: pa.Table, inputs: float | None = None) -> None:
        """Finished output rows, as written (JSON answers parsed); `inputs`: the manifest rows they finish."""
        statuses = batch.column(schema.STATUS).to_pylist() if schema.STATUS in batch.column_names else []
        with self.lock:
            self.done += batch.num_rows if inputs is None else inputs
            self.outputs += batch.num_rows
            self.ok += sum(status == schema.OK for status in statuses)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.draw()
        with self.lock:
            if self.bar:
                self.stream.write("\n")
                self.stream.flush()
                Progress.active = None

    def _tick(self) -> None:
        while not self._stop.wait(self.every_s):
            self.draw()

    def numbers(self) -> str:
        """`24/48 rows (50%), 1.90 rows/s, ETA 0:00:13, ok 23, errors 1, 0:00:12 elapsed`.

        The rate is over the whole run, start-up included, as the summary's images/s; before the first
        rows it says what the run is waiting for.
        """
        with self.lock:
            elapsed = time.monotonic() - self.started
            share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            rate = eta = "-"
            if self.done and elapsed > 0:
                per_s = self.done / elapsed
                rate, eta = f"{per_s:.2f}", _duration((self.total - self.done) / per_s)
            text = (
                f"{round(self.done)}/{self.total} rows{share}, {rate} rows/s, ETA {eta}, ok {self.ok}, "
                f"errors {self.outputs - self.ok}, {_duration(elapsed)} elapsed"
            )
            return text if self.done else text + " (starting the load actors and model replicas)"

    def draw(self) -> None:
        with self.lock:
            text = self.numbers()
            if self.bar:
                filled = int(BAR_WIDTH * self.done // self.total) if self.total else 0
                line = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {text}"
                self.stream.write(f"\r{line[: self._columns() - 1]}\x1b[K")
            else:
                self.stream.write(f"progress: {text}\n")
            self.stream.flush()

    def _columns(self) -> int:
        """The terminal's width: a bar longer than a line would wrap, and each redraw add a line."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or sys.maxsize
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            return sys.maxsize

    def clear(self) -> None:
        """Wipe the bar's line, for a log line to take it (the next draw puts the bar back below)."""
        if self.bar:
            self.stream.write("\r\x1b[K")


class ConsoleHandler(logging.StreamHandler):
    """The command line's log lines, on stderr, written above the progress bar rather than into it."""

    def emit(self, record: logging.LogRecord) -> None:
        bar = Progress.active
        if bar is None or bar.stream is not self.stream:
            super().emit(record)
            return
        with bar.lock:
            bar.clear()
            super().emit(record)
            bar.draw()


def report_command(output: str) -> str:
    """The exact command that draws a run's HTML report, into the working directory."""
    name = output.rstrip("/").rsplit("/", 1)[-1] or "output"
    return f"qwenbatch report {shlex.quote(output)} --out {shlex.quote(name + '-report.html')}"
