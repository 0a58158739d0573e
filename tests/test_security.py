"""Security: rows can only point under the allowed prefixes; checkpoints never run code or unpickle.

The prefix check runs through the production `Loader` with the limits the pipeline builds
(`pipeline.limits_for`), without Ray: the Ray wiring of the load stage is proven in test_bad_input.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from qwenbatch import schema
from qwenbatch.config import ConfigError, ModelConfig
from qwenbatch.hub import load_model, load_processor
from qwenbatch.load import Loader
from qwenbatch.locations import LoadError, LoadLimits, allowed_roots, check_location
from qwenbatch.pipeline import limits_for
from tests.helpers import encode, job_config, noise_image, write_manifest

OUTSIDE = "location is outside image.allowed_prefixes"


def limits(*prefixes: str) -> LoadLimits:
    return LoadLimits(min_pixels=4096, max_pixels=65536, allowed_prefixes=allowed_roots(prefixes, []))


# --- the prefix check, directly ----------------------------------------------------------------


@pytest.mark.parametrize(
    "location",
    [
        "https://cdn.example.com/img/a.jpg",
        "HTTPS://CDN.Example.com/img/sub/a.jpg?sig=1",
        "https://user:pw@cdn.example.com/img/a.jpg",
        "s3://bucket/images/a.png",
    ],
)
def test_uri_inside_prefix(location: str) -> None:
    assert check_location(location, limits("https://cdn.example.com/img", "s3://bucket/images/")) == location


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("https://cdn.example.com/img/../secret/a.jpg", "'.' or '..' path segment"),
        ("https://cdn.example.com/img/%2e%2e/secret/a.jpg", "'.' or '..' path segment"),
        ("https://cdn.example.com/img/.%2E%2fsecret", "'.' or '..' path segment"),
        ("https://cdn.example.com/img\\..\\secret", "backslash"),
        ("https://cdn.example.com/imgs/a.jpg", OUTSIDE),
        ("https://cdn.example.com.evil.org/img/a.jpg", OUTSIDE),
        ("https://cdn.example.com@evil.org/img/a.jpg", OUTSIDE),
        ("https://cdn.example.com:8443/img/a.jpg", OUTSIDE),
        ("http://cdn.example.com/img/a.jpg", OUTSIDE),
        ("https://cdn.example.com:99999/img/a.jpg", "invalid port"),
        ("s3://bucket/images-private/a.png", OUTSIDE),
        ("s3://other/images/a.png", OUTSIDE),
        ("/etc/passwd", OUTSIDE),
        ("file:///etc/passwd", OUTSIDE),
    ],
)
def test_uri_outside_prefix(location: str, reason: str) -> None:
    with pytest.raises(LoadError, match=reason.replace(".", r"\.").replace("(", r"\(")):
        check_location(location, limits("https://cdn.example.com/img", "s3://bucket/images/"))


def test_scheme_prefix_allows_all_of_it() -> None:
    every_https = limits("https://")
    assert check_location("https://anywhere.example/x.png", every_https)
    with pytest.raises(LoadError, match=OUTSIDE):
        check_location("http://anywhere.example/x.png", every_https)
    with pytest.raises(LoadError, match=r"outside image.allowed_prefixes \(none\)"):
        check_location("/tmp/x.png", limits())


def test_default_roots_are_the_manifest_folders(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "day.parquet").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "m")
    real = os.path.realpath(tmp_path)
    assert allowed_roots(None, [str(tmp_path / "m" / "day.parquet")]) == (f"{real}/m",)  # a file: its folder
    assert allowed_roots(None, [str(tmp_path / "m")]) == (f"{real}/m",)  # a folder: itself
    assert allowed_roots(None, [str(tmp_path / "link" / "*.parquet")]) == (f"{real}/m",)  # a glob, via a symlink
    assert allowed_roots(None, [f"{tmp_path}/m/../m/day.parquet", str(tmp_path / "m")]) == (f"{real}/m",)
    assert allowed_roots(("s3://Bucket/x/", str(tmp_path / "link")), []) == ("s3://bucket/x/", f"{real}/m")
    with pytest.raises(ConfigError, match=r"image.allowed_prefixes: https://h/a/\.\./b: location has a '\.'"):
        allowed_roots(("https://h/a/../b",), [])


# --- local rows through the load stage: outside is never read -----------------------------------


def test_rows_outside_the_manifest_folder_are_refused_unread(tmp_path: Path, tiny_model: Path) -> None:
    job, secret = tmp_path / "job", tmp_path / "secret"
    (job / "images").mkdir(parents=True)
    secret.mkdir()
    picture = encode(noise_image(48, 48, 1), "PNG")
    for folder in (job / "images", secret):
        (folder / "a.png").write_bytes(picture)  # the same valid image inside and outside
    (job / "images" / "link.png").symlink_to(secret / "a.png")
    locations = {
        "inside": str(job / "images" / "a.png"),
        "inside-dotdot": f"{job}/images/../images/a.png",
        "inside-file-uri": f"file://{job}/images/a.png",
        "outside": str(secret / "a.png"),
        "dotdot": f"{job}/images/../../secret/a.png",
        "symlink-out": str(job / "images" / "link.png"),
        "passwd": "/etc/passwd",
        "relative-up": "../../../../../../../../etc/passwd",
        "http-loopback": "http://127.0.0.1:9/a.png",  # port 9 (discard): no fetch may even be tried
        "prefix-sibling": f"{job}x/images/a.png",
    }
    manifest = write_manifest(job / "manifest.parquet", [{"id": k, "image": v} for k, v in locations.items()])
    config = job_config(tiny_model, manifest, tmp_path / "out")
    prefixes = limits_for(config).allowed_prefixes
    assert prefixes == (os.path.realpath(job),)

    batch = pa.table({"id": list(locations), "image": list(locations.values())})
    load = Loader(model=str(tiny_model), revision=None, limits=limits_for(config), image_column="image")
    out = load(batch)

    rows = {row["id"]: row for row in out.select(["id", "status", "error", "width"]).to_pylist()}
    for key in ("inside", "inside-dotdot", "inside-file-uri"):
        assert (rows[key]["status"], rows[key]["error"]) == (schema.OK, None), rows[key]
    for key in ("outside", "dotdot", "symlink-out", "passwd", "relative-up", "http-loopback", "prefix-sibling"):
        assert rows[key]["status"] == schema.LOAD_ERROR, key
        assert rows[key]["error"] == f"{OUTSIDE} ({prefixes[0]})", (key, rows[key]["error"])

    widened = job_config(tiny_model, manifest, tmp_path / "out", image={"allowed_prefixes": [str(tmp_path)]})
    out = Loader(model=str(tiny_model), revision=None, limits=limits_for(widened), image_column="image")(batch)
    statuses = dict(zip(out.column("id").to_pylist(), out.column("status").to_pylist(), strict=True))
    assert {k for k, s in statuses.items() if s == schema.OK} == {
        "inside",
        "inside-dotdot",
        "inside-file-uri",
        "outside",
        "dotdot",
        "symlink-out",
    }


# --- model loading: safetensors only, no remote code ---------------------------------------------


class Canary:
    """Unpickling this creates a folder: proof that a pickle was (or was not) executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_pickle_weights_are_refused(tmp_path: Path, tiny_model: Path) -> None:
    marker = tmp_path / "unpickled"
    pickled = copy_checkpoint(tiny_model, tmp_path / "pickled")
    state = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save({**state, "canary": Canary(marker)}, pickled / "pytorch_model.bin")

    with pytest.raises(OSError, match="no file named model.safetensors"):
        load_model(ModelConfig(name=str(pickled), dtype="float32"), "cpu")
    assert not marker.exists()

    # Both present: the safetensors file is loaded and the pickle is never touched.
    shutil.copy(tiny_model / "model.safetensors", pickled / "model.safetensors")
    model = load_model(ModelConfig(name=str(pickled), dtype="float32"), "cpu")
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert not marker.exists()


def test_remote_code_is_never_run(tmp_path: Path, tiny_model: Path) -> None:
    marker = tmp_path / "remote-code-ran"
    checkpoint = copy_checkpoint(tiny_model, tmp_path / "remote")
    (checkpoint / "evil.py").write_text(
        f"import os\nos.mkdir({str(marker)!r})\n"
        "from transformers import Qwen3VLConfig as Config, Qwen3VLForConditionalGeneration as Model\n"
        "from transformers import Qwen3VLProcessor as Processor\n"
    )
    auto_maps = {
        "config.json": {"AutoConfig": "evil.Config", "AutoModelForImageTextToText": "evil.Model"},
        "processor_config.json": {"AutoProcessor": "evil.Processor"},
        "tokenizer_config.json": {"AutoTokenizer": ["evil.Processor", None]},
    }
    for name, auto_map in auto_maps.items():
        data = json.loads((checkpoint / name).read_text())
        (checkpoint / name).write_text(json.dumps({**data, "auto_map": auto_map}))

    # A known architecture: the library's own classes load, the checkpoint's code is ignored.
    model = load_model(ModelConfig(name=str(checkpoint), dtype="float32"), "cpu")
    processor = load_processor(str(checkpoint), None)
    assert type(model).__module__.startswith("transformers.models.qwen3_vl")
    assert type(processor).__module__.startswith("transformers.models.qwen3_vl")
    assert not marker.exists()

    # An architecture only the checkpoint's code knows: refused, not run.
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "model_type": "qwenbatch_evil"}))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(ModelConfig(name=str(checkpoint), dtype="float32"), "cpu")
    assert not marker.exists()
