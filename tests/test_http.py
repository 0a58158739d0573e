"""Images over http(s) from a real server on 127.0.0.1: good, slow, missing, redirected, endless, flaky;
and a PDF, a row per page.

One pipeline run proves the row contract for all of them together; the address and TLS rules are
checked on the real load stage and fetcher in-process, which costs no Ray run.
"""

from __future__ import annotations

import datetime
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pytest

from qwenbatch import schema
from qwenbatch.fetch import fetch, tls_context
from qwenbatch.load import Loader
from qwenbatch.locations import LoadError, LoadLimits
from qwenbatch.pipeline import limits_for, run
from tests.helpers import encode, job_config, noise_image, read_output, write_manifest
from tests.pdfs import make_pdf

TIMEOUT_S = 0.5
MAX_BYTES = 100_000


class Site:
    """What the server serves, and how often each path was asked for."""

    def __init__(self) -> None:
        self.images = {f"/img/{i}.png": encode(noise_image(48 + 8 * i, 40, i), "PNG") for i in range(3)}
        self.document = make_pdf([(200, 160), (160, 200)], seed=3)
        self.hits: Counter[str] = Counter()
        self.release = threading.Event()  # lets the slow handler go at teardown
        self.lock = threading.Lock()


def handler_for(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def send(self, status: int, body: bytes = b"", **headers: str) -> None:
            self.send_response(status)
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            with site.lock:
                site.hits[self.path] += 1
                hits = site.hits[self.path]
            if self.path in site.images:
                self.send(200, site.images[self.path], **{"Content-Type": "image/png"})
            elif self.path == "/doc.pdf":
                self.send(200, site.document, **{"Content-Type": "application/pdf"})
            elif self.path == "/redirect.png":
                self.send(302, Location="/img/0.png")
            elif self.path == "/loop.png":
                self.send(302, Location="/loop.png")
            elif self.path == "/flaky.png" and hits == 1:  # one 503, then the image
                self.send(503)
            elif self.path == "/flaky.png":
                self.send(200, site.images["/img/1.png"])
            elif self.path == "/slow.png":
                site.release.wait(10)
                self.send(200, site.images["/img/2.png"])
            elif self.path == "/endless.png":  # no Content-Length, a body with no end
                self.send_response(200)
                self.end_headers()
                try:
                    while not site.release.is_set():
                        self.wfile.write(b"\x89PNG" * 16384)
                except OSError:
                    pass
            elif self.path == "/declared-big.png":
                self.send_response(200)
                self.send_header("Content-Length", str(MAX_BYTES * 10))
                self.end_headers()
            else:
                self.send(404)

    return Handler


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that gave up (timeout, byte limit) breaks the pipe: expected here, not news."""


def serve(site: Site, tls: ssl.SSLContext | None = None) -> Iterator[tuple[str, Site]]:
    server = QuietServer(("127.0.0.1", 0), handler_for(site))
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}", site
    site.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def web() -> Iterator[tuple[str, Site]]:
    yield from serve(Site())


def test_web_images_each_get_their_row(tiny_model: Path, ray_local, web: tuple[str, Site], tmp_path: Path) -> None:
    base, site = web
    paths = {
        "ok-0": "/img/0.png",
        "ok-1": "/img/1.png",
        "ok-2": "/img/2.png",
        "redirected": "/redirect.png",
        "flaky": "/flaky.png",
        "slow": "/slow.png",
        "missing": "/missing.png",
        "loop": "/loop.png",
        "endless": "/endless.png",
        "declared-big": "/declared-big.png",
        "doc": "/doc.pdf",
    }
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": k, "image": base + p} for k, p in paths.items()])
    image = {
        "allowed_prefixes": [base + "/"],
        "allow_private_network": True,
        "fetch_timeout_s": TIMEOUT_S,
        "fetch_retries": 1,
        "fetch_backoff_s": 0.01,
        "max_bytes": MAX_BYTES,
    }
    started = time.monotonic()
    result = run(job_config(tiny_model, manifest, tmp_path / "out", image=image))
    print(f"pipeline over {len(paths)} web rows: {time.monotonic() - started:.1f}s")

    rows = {row["id"]: row for row in read_output(tmp_path / "out").to_pylist()}
    assert sorted(rows) == sorted([*(key for key in paths if key != "doc"), "doc#p1", "doc#p2"])
    for key in ("ok-0", "ok-1", "ok-2", "redirected", "flaky", "doc#p1", "doc#p2"):
        assert rows[key]["status"] == schema.OK, rows[key]["error"]
        assert rows[key]["text"] is not None
    expected = {
        "slow": f"timed out after {TIMEOUT_S:g}s (gave up after 2 attempts)",
        "missing": "HTTP 404 Not Found",
        "loop": "more than 5 redirects",
        "endless": f"image is over the limit of {MAX_BYTES} bytes (stopped reading)",
        "declared-big": f"image is {MAX_BYTES * 10} bytes, over the limit of {MAX_BYTES}",
    }
    for key, error in expected.items():
        assert (rows[key]["status"], rows[key]["error"]) == (schema.LOAD_ERROR, error)
    # Retries only where the failure may pass: a 503 and a timeout, never a 404.
    assert site.hits["/flaky.png"] == 2
    assert site.hits["/slow.png"] == 2
    assert site.hits["/missing.png"] == 1
    assert site.hits["/loop.png"] == 6  # the request and five redirects
    assert site.hits["/doc.pdf"] == 1  # a document is fetched once for all its pages
    assert result.summary["output"]["status"] == {schema.OK: 7, schema.LOAD_ERROR: 5}


def test_private_addresses_are_refused_by_default(tiny_model: Path, web: tuple[str, Site], tmp_path: Path) -> None:
    """Even with the URL allow-listed, the default config fetches nothing from loopback."""
    base, site = web
    port = base.rsplit(":", 1)[1]
    config = job_config(
        tiny_model, tmp_path / "m.parquet", tmp_path / "out", image={"allowed_prefixes": [base + "/", "http://"]}
    )
    limits = limits_for(config)
    assert limits.allow_private_network is False
    before = sum(site.hits.values())
    batch = pa.table(
        {
            "id": ["ip", "name"],
            "image": [f"{base}/img/0.png", f"http://localhost:{port}/img/0.png"],
        }
    )
    out = Loader(model=str(tiny_model), revision=None, limits=limits, image_column="image")(batch)
    assert out.column(schema.STATUS).to_pylist() == [schema.LOAD_ERROR, schema.LOAD_ERROR]
    assert out.column(schema.ERROR).to_pylist() == [
        "refused: 127.0.0.1 is a loopback address; set image.allow_private_network: true to allow it",
        "refused: localhost resolves to 127.0.0.1, a loopback address; "
        "set image.allow_private_network: true to allow it",
    ]
    assert sum(site.hits.values()) == before


def test_each_redirect_target_is_checked(web: tuple[str, Site]) -> None:
    """A redirect cannot lead the fetcher out of the allowed prefixes: every hop is checked again."""
    base, site = web
    only_the_redirect = LoadLimits(
        min_pixels=1, max_pixels=1, allowed_prefixes=(f"{base}/redirect.png",), allow_private_network=True
    )
    before = site.hits["/img/0.png"]
    with pytest.raises(LoadError, match=r"^location is outside image.allowed_prefixes"):
        fetch(f"{base}/redirect.png", only_the_redirect)
    assert site.hits["/img/0.png"] == before


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for the name `localhost` only (no IP address in it), and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_https_connects_to_the_checked_address_and_verifies_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust it, as a system CA bundle would
    tls_context.cache_clear()  # the process's context is built once; rebuild it with this CA
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    served = serve(Site(), tls)
    base, site = next(served)
    try:
        port = base.rsplit(":", 1)[1]
        limits = LoadLimits(
            min_pixels=1, max_pixels=1, allowed_prefixes=("https://",), allow_private_network=True, fetch_retries=2
        )
        assert fetch(f"https://localhost:{port}/img/0.png", limits) == site.images["/img/0.png"]
        started = time.monotonic()
        with pytest.raises(LoadError, match=r"^TLS certificate rejected: IP address mismatch"):
            fetch(f"https://127.0.0.1:{port}/img/0.png", limits)  # the certificate names localhost only
        assert time.monotonic() - started < 1  # a bad certificate is final: no retries, no backoff
        assert site.hits["/img/0.png"] == 1
    finally:
        tls_context.cache_clear()
        next(served, None)
