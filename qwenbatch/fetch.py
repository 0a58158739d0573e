"""Fetch image bytes from object stores (`s3://`, `gs://`) and the web (`http(s)://`).

Every fetch is bounded: a time limit per attempt, retries with exponential backoff on transient
failures only (5xx, 429, timeouts, dropped connections; never 404 or 403), and the byte limit
enforced while reading, so an endless body costs at most `max_bytes + 1` bytes. Web fetches
refuse private, loopback and link-local addresses unless allowed, connect to the very address
they checked (no second DNS answer in between), and follow a bounded number of redirects, each
target checked again. Every failure is a LoadError whose one-line message becomes the row's error.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import random
import re
import socket
import ssl
import time
from collections.abc import Callable
from importlib import metadata
from urllib.parse import urljoin, urlsplit

from qwenbatch import schema, storage
from qwenbatch.locations import LoadError, LoadLimits, check_location

HTTP_SCHEMES = ("http", "https")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
RETRY_STATUSES = (408, 429)  # and every 5xx
HEADERS = {"User-Agent": f"qwenbatch/{metadata.version('qwenbatch')}", "Accept": "image/*, */*;q=0.5"}
# pyarrow reports object-store failures as OSError text; these mark the ones worth retrying
# (AWS SDK error names and HTTP statuses, Google Cloud status codes).
_STORE_TRANSIENT = ("NETWORK_CONNECTION", "SLOW_DOWN", "THROTTLING", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE")
_STORE_TRANSIENT += ("REQUEST_TIMEOUT", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")
_STORE_STATUS = re.compile(r"HTTP status (\d{3})")
_STORE_CONTEXT = re.compile(r"^When [^:]*: ")  # "When reading information for key 'k' in bucket 'b': "


class Transient(Exception):
    """A failure that may pass if tried again after a wait."""


def fetch(location: str, limits: LoadLimits) -> bytes:
    """The bytes at a URI, within the limits; a LoadError once the retries are spent."""
    scheme, _ = storage.split_uri(location)
    if scheme in HTTP_SCHEMES:
        return with_retries(functools.partial(_http_get, location, limits), limits)
    if scheme in storage.S3_SCHEMES + storage.GCS_SCHEMES:
        return with_retries(functools.partial(_object_get, location, limits), limits)
    raise LoadError(f"unsupported location scheme {scheme}://")


def with_retries(attempt: Callable[[], bytes], limits: LoadLimits) -> bytes:
    """Try again after a Transient failure, up to `fetch_retries` times; any other error is final."""
    failures = 0
    while True:
        try:
            return attempt()
        except Transient as exc:
            failures += 1
            if failures > limits.fetch_retries:
                raise LoadError(f"{exc} (gave up after {failures} attempts)") from None
            time.sleep(backoff(failures, limits.fetch_backoff_s))


def backoff(failures: int, base_s: float) -> float:
    """Exponential with jitter, so that many workers failing together do not retry together."""
    return min(schema.FETCH_BACKOFF_MAX_S, base_s * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)


# --- object stores -------------------------------------------------------------------------------


def _object_get(location: str, limits: LoadLimits) -> bytes:
    scheme, path = storage.split_uri(location)
    fs = storage.filesystem(scheme, limits.storage, limits.fetch_timeout_s)
    try:
        with fs.open_input_file(path) as handle:
            size = handle.size()
            if size > limits.max_bytes:
                raise LoadError(f"image is {size} bytes, over the limit of {limits.max_bytes}")
            return handle.read(size)
    except FileNotFoundError:
        raise LoadError("not found in the object store") from None
    except OSError as exc:
        message = _STORE_CONTEXT.sub("", " ".join(str(exc).split()))
        status = _STORE_STATUS.search(message)
        code = int(status.group(1)) if status else 0
        if code >= 500 or code in RETRY_STATUSES or any(word in message for word in _STORE_TRANSIENT):
            raise Transient(message) from None
        raise LoadError(message) from None


# --- the web -------------------------------------------------------------------------------------


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to an address already resolved and checked, with the URL's host name
    kept for the Host header, TLS server name and certificate check."""

    def __init__(self, host: str, port: int, address: str, timeout: float, tls: ssl.SSLContext | None) -> None:
        super().__init__(host, port, timeout=timeout)
        self.default_port = 443 if tls else 80
        self.address = address
        self.tls = tls
        self.raw: socket.socket | None = None  # outlives `self.sock`, which a closing response clears

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.raw = self.tls.wrap_socket(sock, server_hostname=self.host) if self.tls else sock


def _http_get(url: str, limits: LoadLimits) -> bytes:
    deadline = time.monotonic() + limits.fetch_timeout_s
    for _ in range(limits.max_redirects + 1):
        connection = _connect(url, limits, deadline)
        try:
            response = _exchange(connection, url, limits, deadline)
            if response.status in REDIRECT_STATUSES:
                target = response.getheader("Location")
                if not target:
                    raise LoadError(f"HTTP {response.status} redirect without a Location header")
                url = check_location(urljoin(url, target), limits)
                continue
            if response.status >= 500 or response.status in RETRY_STATUSES:
                raise Transient(f"HTTP {response.status} {response.reason}".strip())
            if response.status != 200:
                raise LoadError(f"HTTP {response.status} {response.reason}".strip())
            return _read_capped(response, connection, limits, deadline)
        except ssl.SSLCertVerificationError as exc:
            raise LoadError(f"TLS certificate rejected: {exc.verify_message}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise Transient(_describe(exc, limits)) from None
        finally:
            connection.close()
    raise LoadError(f"more than {limits.max_redirects} redirects")


def _connect(url: str, limits: LoadLimits, deadline: float) -> _PinnedConnection:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in HTTP_SCHEMES or not parts.hostname:
        raise LoadError(f"not an http(s) URL: {scheme}://")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise LoadError("invalid port in URL") from None
    address = _checked_address(parts.hostname, port, limits.allow_private_network)
    tls = tls_context() if scheme == "https" else None
    return _PinnedConnection(parts.hostname, port, address, _remaining(deadline, limits), tls)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One per process: building it loads the system CA store, tens of milliseconds."""
    return ssl.create_default_context()


def _exchange(connection: _PinnedConnection, url: str, limits: LoadLimits, deadline: float) -> http.client.HTTPResponse:
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection.request("GET", target, headers=HEADERS)
    if connection.raw is not None:
        connection.raw.settimeout(_remaining(deadline, limits))
    return connection.getresponse()


def _read_capped(
    response: http.client.HTTPResponse, connection: _PinnedConnection, limits: LoadLimits, deadline: float
) -> bytes:
    """The body, refusing a declared or actual size over the limit without reading past it."""
    declared = response.getheader("Content-Length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise LoadError(f"image is {declared} bytes, over the limit of {limits.max_bytes}")
    chunks: list[bytes] = []
    total = 0
    while not response.isclosed():  # closed once the body is complete
        if connection.raw is not None:
            connection.raw.settimeout(_remaining(deadline, limits))
        chunk = response.read(min(schema.FETCH_CHUNK_BYTES, limits.max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > limits.max_bytes:
            raise LoadError(f"image is over the limit of {limits.max_bytes} bytes (stopped reading)")
    return b"".join(chunks)


def _remaining(deadline: float, limits: LoadLimits) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise Transient(f"timed out after {limits.fetch_timeout_s:g}s")
    return left


def _describe(exc: BaseException, limits: LoadLimits) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {limits.fetch_timeout_s:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _checked_address(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to; every address the host resolves to must be public unless allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            raise Transient(f"DNS lookup for {host} failed: {exc.strerror}") from None
        raise LoadError(f"cannot resolve host {host}: {exc.strerror}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not allow_private:
        for text in addresses:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            if not ip.is_global or ip.is_multicast:
                where = f"{ip} is" if host == text else f"{host} resolves to {ip},"
                raise LoadError(
                    f"refused: {where} a {_kind(ip)} address; set image.allow_private_network: true to allow it"
                )
    return addresses[0]


def _kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    for kind in ("loopback", "link_local", "private", "multicast", "unspecified"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return "non-public"
