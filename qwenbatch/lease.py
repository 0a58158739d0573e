"""One writer per output: a lease object in the output folder that one run holds at a time.

A run takes the lease before it writes anything (temp-file cleanup, indexes, shards, summary) and
gives it back when it ends. The lease (`_lease.json`) names the run, host and pid, and the run
renews it every `timeout / LEASE_RENEWALS_PER_TIMEOUT` seconds. It is created atomically (locally
`O_EXCL`; on S3 a conditional create, `If-None-Match: *`) and renewed, taken over and given back
only by a conditional write against the version last seen (locally under an flock of the output
folder; on S3 `If-Match` on the ETag), so of two runs that race for it exactly one wins.

A second run finds it held and stops (`LeaseHeld`). A lease not renewed for `timeout` seconds (by
the store's clock: the file's mtime, the object's LastModified), or one whose holder ran on this
host and is gone (a `kill -9`), is taken over, and the log says so. A writer checks, by renewing,
that its run still holds the lease just before it publishes each shard: a run frozen past the
timeout and then resumed (a straggler) finds the lease taken over and writes no shard beside its
successor's (`LeaseLost`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Protocol

from qwenbatch import schema, storage

log = logging.getLogger(__name__)


class LeaseHeld(Exception):
    """Another run holds the output's lease; the message is one line naming it."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over (or could not be renewed in time): it must not write again."""


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    started: float  # epoch seconds, when the run took the lease
    heartbeat: float  # epoch seconds, its last renewal (the store's own time decides staleness)

    @classmethod
    def this_process(cls, run_id: str) -> Holder:
        now = time.time()
        return cls(run_id, socket.gethostname(), os.getpid(), now, now)

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> Holder | None:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None  # a lease cut short by a crash while it was created: it ages out

    def gone(self) -> bool:
        """The holder ran on this host and its process is no longer there (or the pid is another's now)."""
        import psutil

        if self.host != socket.gethostname():
            return False
        try:
            process = psutil.Process(self.pid)
            return process.status() == psutil.STATUS_ZOMBIE or process.create_time() > self.started + 1
        except psutil.NoSuchProcess:
            return True

    def describe(self, age_s: float) -> str:
        return f"run {self.run_id} (host {self.host}, pid {self.pid}, last renewed {age_s:.0f}s ago)"


class LeaseStore(Protocol):
    """The lease object on one kind of storage; a token identifies the version a caller last saw."""

    def create(self, data: bytes) -> str | None: ...  # the new token; None when a lease exists

    def read(self) -> tuple[bytes, str, float] | None: ...  # (data, token, seconds since written)

    def replace(self, data: bytes, token: str) -> str | None: ...  # None when `token` is no longer current

    def delete(self, token: str) -> None: ...  # only if `token` is still current


class LocalLeaseStore:
    """A file, created with O_EXCL; every change made under an flock of the output folder."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.path = storage.join(base, schema.LEASE_FILE)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.base, exist_ok=True)
        folder = os.open(self.base, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            yield
        finally:
            os.close(folder)  # releases the flock

    def _current(self) -> tuple[bytes, str, float] | None:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
                age = time.time() - os.fstat(handle.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return data, _digest(data), age

    def create(self, data: bytes) -> str | None:
        with self._locked():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        return _digest(data)

    def read(self) -> tuple[bytes, str, float] | None:
        with self._locked():
            return self._current()

    def replace(self, data: bytes, token: str) -> str | None:
        with self._locked():
            current = self._current()
            if current is None or current[1] != token:
                return None
            with open(self.path, "r+b") as out:  # in place: every reader holds the flock too
                out.truncate()
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        return _digest(data)

    def delete(self, token: str) -> None:
        with self._locked():
            current = self._current()
            if current is not None and current[1] == token:
                os.remove(self.path)


class S3LeaseStore:
    """An object, created with `If-None-Match: *`; renewed, taken over and deleted with `If-Match: <ETag>`."""

    def __init__(self, path: str) -> None:
        import boto3

        options = storage.active()
        self.client = boto3.client(
            "s3",
            endpoint_url=options.endpoint_url,
            region_name=options.region,
            **({"config": _unsigned()} if options.anonymous else {}),
        )
        self.bucket, _, prefix = path.partition("/")
        self.key = f"{prefix}/{schema.LEASE_FILE}" if prefix else schema.LEASE_FILE

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except self.client.exceptions.ClientError as exc:
            if _lost_race(exc):
                return None
            raise

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def read(self) -> tuple[bytes, str, float] | None:
        try:
            found = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        age = (datetime.now(UTC) - found["LastModified"]).total_seconds()
        return found["Body"].read(), found["ETag"], age

    def replace(self, data: bytes, token: str) -> str | None:
        return self._put(data, IfMatch=token)

    def delete(self, token: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=token)
        except self.client.exceptions.ClientError as exc:
            if not _lost_race(exc):
                raise


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _lost_race(exc: Exception) -> bool:
    """412: the condition failed (the lease exists, or changed); 409: a concurrent conditional write won."""
    status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status in (409, 412)


def _unsigned():
    from botocore import UNSIGNED
    from botocore.config import Config

    return Config(signature_version=UNSIGNED)


def store_for(output: str) -> LeaseStore | None:
    """The lease store of an output; None where the storage offers no conditional create (gs://)."""
    fs, base = storage.resolve(output)
    if storage.is_local(fs):
        return LocalLeaseStore(base)
    if storage.split_uri(output)[0] in storage.S3_SCHEMES:
        return S3LeaseStore(base)
    return None


class Lease:
    """This run's hold on an output: renewed in a thread of its own until `release`."""

    def __init__(self, output: str, store: LeaseStore | None, holder: Holder, token: str, timeout_s: float) -> None:
        self.output = output
        self.store = store
        self.holder = holder
        self.token = token
        self.timeout_s = timeout_s
        self.renewed = time.monotonic()
        self.lost: str | None = None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._renew_until_released, name="qwenbatch-lease", daemon=True)

    @classmethod
    def acquire(cls, output: str, run_id: str, timeout_s: float) -> Lease:
        """Take the output's lease, or take over one that is stale; LeaseHeld when another run holds it."""
        store = store_for(output)
        holder = Holder.this_process(run_id)
        if store is None:
            log.warning("%s: this storage offers no conditional create; no lease guards this output", output)
            return cls(output, None, holder, "", timeout_s)
        for _ in range(schema.LEASE_ACQUIRE_TRIES):
            token = store.create(holder.encode())
            if token is not None:
                return cls(output, store, holder, token, timeout_s).start()
            current = store.read()
            if current is None:
                continue  # given back between the two calls
            data, seen, age = current
            other = Holder.decode(data)
            shown = other.describe(age) if other else f"an unreadable lease written {age:.0f}s ago"
            gone = other is not None and other.gone()
            if age < timeout_s and not gone:
                raise LeaseHeld(f"{output} is being written by {shown}; not starting a second writer")
            token = store.replace(holder.encode(), seen)
            if token is not None:
                why = "its process is gone" if gone else f"not renewed in {timeout_s:g}s"
                log.warning("took over the lease on %s from %s: %s", output, shown, why)
                return cls(output, store, holder, token, timeout_s).start()
        raise LeaseHeld(f"{output}: another run took the lease first; not starting a second writer")

    def start(self) -> Lease:
        self.thread.start()
        return self

    def ensure_held(self) -> None:
        """Renew now; LeaseLost if the lease is another run's. Writers call it before each publish."""
        if self.store is None:
            return
        with self.lock:
            if self.lost is None:
                self._renew()
            if self.lost is not None:
                raise LeaseLost(f"{self.output}: this run no longer holds the output's lease ({self.lost})")

    def _renew(self) -> None:
        """Under `self.lock`: the conditional write of a new heartbeat."""
        assert self.store is not None
        now = time.time()
        beat = Holder(self.holder.run_id, self.holder.host, self.holder.pid, self.holder.started, now)
        token = self.store.replace(beat.encode(), self.token)
        if token is None:
            self.lost = "another run took it over"
            return
        if time.monotonic() - self.renewed > self.timeout_s:
            log.warning("%s: the lease was not renewed for %.0fs, past its timeout", self.output, now - self.renewed)
        self.token, self.renewed = token, time.monotonic()

    def _renew_until_released(self) -> None:
        interval = self.timeout_s / schema.LEASE_RENEWALS_PER_TIMEOUT
        while not self.stopped.wait(interval):
            with self.lock:
                if self.lost is not None:
                    return
                try:
                    self._renew()
                except Exception as exc:  # noqa: BLE001 - a store hiccup: the next renewal tries again
                    log.warning("%s: renewing the lease failed: %s", self.output, exc)
                if self.lost is not None:
                    log.error("%s: the lease was taken over by another run; this run writes nothing more", self.output)

    def release(self) -> None:
        """Stop renewing and give the lease back (only if it is still this run's)."""
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()
        if self.store is not None and self.lost is None:
            with self.lock:
                self.store.delete(self.token)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
