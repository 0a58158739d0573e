"""What a person sees while a job runs: one progress bar (or a line every 30 s), and Ray kept quiet.

In a terminal the run is one bar: rows done of the total, rows/s, ETA, ok and error counts. Without
one (a log file, CI) the same numbers come as one line every `every_s` seconds. Ray's harmless
chatter is turned off where it starts, by Ray's own settings and logger levels, never by filtering
the output, so real warnings still show; `--verbose` leaves Ray as it is, operator table included.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import threading
import time
from typing import ClassVar, TextIO

import pyarrow as pa

from qwenbatch import schema

BAR_REFRESH_S = 0.5
BAR_WIDTH = 24
DEFAULT_EVERY_S = 30.0
# Ray Data logs that it was asked for no progress bars, and Ray that token authentication is on (the
# default for a local cluster): both say what qwenbatch chose, so these two loggers show errors only.
QUIET_LOGGERS = ("ray.data._internal.progress", "ray._private.authentication.authentication_token_setup")


def quiet_ray(verbose: bool = False) -> None:
    """Before Ray starts: no operator table, no execution banners, no weight-loading bars in the workers.

    Ray Data's actor pools pass their constructor a reference to the object store, which makes Ray core
    log, at ERROR, that such actors may fail to restart (ray-project/ray#57733); Ray Data holds that
    reference for the whole run, so it does not apply. Only the driver logs it: its C++ log level
    (RAY_BACKEND_LOG_LEVEL) is raised for this process alone, with `putenv`, so the GCS, the raylet
    and the workers this process starts keep theirs. A level the user set is left alone.
    """
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights" bars of local workers
    if "RAY_BACKEND_LOG_LEVEL" not in os.environ:
        os.putenv("RAY_BACKEND_LOG_LEVEL", "fatal")  # not os.environ: child processes keep Ray's default
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
        self.total = self.done = self.ok = 0
        self.started = time.monotonic()
        self.first: tuple[float, int] | None = None  # when the first block finished, and its rows
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

    def add(self, batch: pa.Table) -> None:
        statuses = batch.column(schema.STATUS).to_pylist() if schema.STATUS in batch.column_names else []
        with self.lock:
            self.done += batch.num_rows
            self.ok += sum(status == schema.OK for status in statuses)
            if self.first is None:
                self.first = (time.monotonic(), self.done)

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
        """`24/48 rows (50%), 1.9 rows/s, ETA 0:00:13, ok 23, errors 1, 0:00:31 elapsed`."""
        with self.lock:
            now = time.monotonic()
            share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            rate = eta = "-"
            if self.first is not None and self.done > self.first[1] and now > self.first[0]:
                per_s = (self.done - self.first[1]) / (now - self.first[0])
                rate, eta = f"{per_s:.2f}", _duration((self.total - self.done) / per_s)
            elif self.total and self.done >= self.total:
                eta = _duration(0)
            return (
                f"{self.done}/{self.total} rows{share}, {rate} rows/s, ETA {eta}, ok {self.ok}, "
                f"errors {self.done - self.ok}, {_duration(now - self.started)} elapsed"
            )

    def draw(self) -> None:
        with self.lock:
            text = self.numbers()
            if self.bar:
                filled = BAR_WIDTH * self.done // self.total if self.total else 0
                self.stream.write(f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {text}\x1b[K")
            else:
                self.stream.write(f"progress: {text}\n")
            self.stream.flush()

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
