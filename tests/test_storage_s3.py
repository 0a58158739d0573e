"""Manifests, images and output on a real S3-compatible server (moto) on 127.0.0.1, and broken stores.

The job run reads its manifest and images from the server and writes its output back to it; a
second run over a grown manifest folder resumes from that output. Store failures (errors, a
server that never answers) go through the real load stage in-process: no Ray run needed.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from qwenbatch import schema, storage
from qwenbatch.cli import main
from qwenbatch.config import InputConfig, StorageConfig
from qwenbatch.load import Loader
from qwenbatch.pipeline import limits_for, run
from qwenbatch.read import open_manifest, read_manifest
from tests.helpers import encode, job_config, moto_s3, noise_image
from tests.pdfs import make_pdf

# Credentials come from each process's environment, never the config. Set here, at collection,
# before the session's Ray starts, so that its workers inherit them as a cluster's nodes would.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "qwenbatch-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "qwenbatch-test")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

BUCKET = "photos"
IMAGES = ["a/0.png", "a/1.jpg", "a/deeper/2.png", "b/3.jpg", "b/4.png", "5.png"]
DOCUMENT = "docs/form.pdf"  # two pages: two output rows, one manifest row
PAGES = [f"{DOCUMENT}#p1", f"{DOCUMENT}#p2"]


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A moto S3 server on a free loopback port, with a bucket of images."""
    with moto_s3(BUCKET) as endpoint:
        fs = pafs.S3FileSystem(endpoint_override=endpoint)
        for index, name in enumerate(IMAGES):
            fmt = "PNG" if name.endswith(".png") else "JPEG"
            put(fs, f"{BUCKET}/images/{name}", encode(noise_image(40 + 8 * index, 36, index), fmt))
        put(fs, f"{BUCKET}/images/{DOCUMENT}", make_pdf([(240, 180), (180, 240)], seed=5))
        put(fs, f"{BUCKET}/images/notes.txt", b"not an image")
        put(fs, f"{BUCKET}/images/.hidden/6.png", encode(noise_image(32, 32, 6), "PNG"))
        yield endpoint


def put(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as out:
        out.write(data)


def read_s3_output(endpoint: str, prefix: str) -> pa.Table:
    fs = pafs.S3FileSystem(endpoint_override=endpoint)
    return pads.dataset(f"{BUCKET}/{prefix}", filesystem=fs, format="parquet").to_table()


def test_job_reads_from_and_writes_to_s3_and_resumes_there(
    tiny_model: Path, ray_local, s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)  # the driver's environment; the job carries it to workers
    assert main(["manifest", f"s3://{BUCKET}/images", f"s3://{BUCKET}/manifests/images.parquet"]) == 0
    output = f"s3://{BUCKET}/out"
    image = {"allowed_prefixes": [f"s3://{BUCKET}/images/"]}
    first = run(job_config(tiny_model, f"s3://{BUCKET}/manifests/images.parquet", output, image=image))

    assert first.succeeded
    rows = read_s3_output(s3, "out").to_pylist()
    assert sorted(row["id"] for row in rows) == sorted([*IMAGES, *PAGES])
    assert all(row["status"] == schema.OK and row["text"] is not None for row in rows), rows
    assert {row["image"] for row in rows} == {f"s3://{BUCKET}/images/{name}" for name in [*IMAGES, DOCUMENT]}

    # A second manifest lands beside the first: the rerun over the folder does only its row.
    fs = pafs.S3FileSystem(endpoint_override=s3)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": ["gone"], "image": [f"s3://{BUCKET}/images/gone.png"]}), sink)
    put(fs, f"{BUCKET}/manifests/extra.parquet", sink.getvalue().to_pybytes())
    second = run(job_config(tiny_model, f"s3://{BUCKET}/manifests/", output, image=image), force=True)

    assert second.summary["skipped_done"] == len(IMAGES) + 1  # the document's pages were done
    assert second.summary["this_run"]["rows"] == 1
    table = read_s3_output(s3, "out")
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted([*IMAGES, *PAGES, "gone"])
    gone = next(row for row in table.to_pylist() if row["id"] == "gone")
    assert (gone["status"], gone["error"]) == (schema.LOAD_ERROR, "not found in the object store")
    assert fs.get_file_info(f"{BUCKET}/out/{schema.SUCCESS_FILE}").type == pafs.FileType.File
    assert second.summary["output"]["status"] == {schema.OK: len(IMAGES) + len(PAGES), schema.LOAD_ERROR: 1}


def test_webdataset_tars_on_s3(ray_local, s3: str, tmp_path: Path) -> None:
    """Remote tars: keys listed by streaming the headers once, samples read by Ray through the same client."""
    from tests.test_webdataset_hf import write_tar

    tar = write_tar(tmp_path / "0.tar", [("k0.png", encode(noise_image(20, 20, 0), "PNG")), ("k0.txt", b"zero")])
    fs = pafs.S3FileSystem(endpoint_override=s3)
    put(fs, f"{BUCKET}/shards/0.tar", tar.read_bytes())
    put(fs, f"{BUCKET}/shards/1.tar", write_tar(tmp_path / "1.tar", [("k1.jpg", b"not really")]).read_bytes())
    config = InputConfig(path=f"s3://{BUCKET}/shards", format="webdataset")
    storage.configure(StorageConfig(endpoint_url=s3))
    try:
        manifest = open_manifest(config)
        rows = sorted(read_manifest(manifest, config).take_all(), key=lambda row: row["id"])
    finally:
        storage.configure(StorageConfig())

    assert manifest.file_rows == (1, 1)  # one sample in each tar, read as the rows below
    assert [(row["id"], row["txt"], row[schema.SHARD]) for row in rows] == [
        ("k0", "zero", f"{BUCKET}/shards/0.tar"),
        ("k1", None, f"{BUCKET}/shards/1.tar"),
    ]
    assert rows[0][schema.IMAGE_BYTES][:4] == b"\x89PNG" and rows[1][schema.IMAGE_BYTES] == b"not really"


class FailingStore(BaseHTTPRequestHandler):
    """Pretends to be S3: 500 under /bucket/fail/, 403 under /bucket/denied/, 404 elsewhere."""

    hits: Counter[str] = Counter()

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - the http.server API
        FailingStore.hits[self.path] += 1
        status = 500 if "/fail/" in self.path else 403 if "/denied/" in self.path else 404
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD


def store_loader(tiny_model: Path, tmp_path: Path, endpoint: str, **image: object) -> Loader:
    """The real load stage, with the limits a job config with this endpoint gives."""
    config = job_config(
        tiny_model,
        tmp_path / "m.parquet",
        tmp_path / "out",
        storage={"endpoint_url": endpoint},
        image={"allowed_prefixes": ["s3://bucket/"], "fetch_backoff_s": 0.01, **image},
    )
    return Loader(model=str(tiny_model), revision=None, limits=limits_for(config), image_column="image")


def test_store_errors_become_row_errors_retrying_only_transient_ones(tiny_model: Path, tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FailingStore)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        loader = store_loader(tiny_model, tmp_path, f"http://127.0.0.1:{server.server_address[1]}", fetch_retries=2)
        keys = ["fail/a.png", "denied/b.png", "nothere/c.png"]
        out = loader(pa.table({"id": ["fail", "denied", "missing"], "image": [f"s3://bucket/{k}" for k in keys]}))
    finally:
        server.shutdown()
        server.server_close()
    assert out.column(schema.STATUS).to_pylist() == [schema.LOAD_ERROR] * 3
    failed, denied, missing = out.column(schema.ERROR).to_pylist()
    assert "HTTP status 500" in failed and failed.endswith("(gave up after 3 attempts)")
    assert "ACCESS_DENIED" in denied and "gave up" not in denied
    assert missing == "not found in the object store"
    assert FailingStore.hits == {"/bucket/fail/a.png": 3, "/bucket/denied/b.png": 1, "/bucket/nothere/c.png": 1}


def test_a_store_that_never_answers_hits_the_timeout(tiny_model: Path, tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)  # accepts connections, never answers
    try:
        loader = store_loader(
            tiny_model,
            tmp_path,
            f"http://127.0.0.1:{listener.getsockname()[1]}",
            fetch_timeout_s=1,
            fetch_retries=1,
        )
        started = time.monotonic()
        out = loader(pa.table({"id": ["hung"], "image": ["s3://bucket/hung.png"]}))
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    error = out.column(schema.ERROR)[0].as_py()
    assert out.column(schema.STATUS)[0].as_py() == schema.LOAD_ERROR
    assert "Timeout was reached" in error and error.endswith("(gave up after 2 attempts)"), error
    print(f"two timed-out attempts took {elapsed:.1f}s")
    assert elapsed < 30  # without the timeout it would never end
