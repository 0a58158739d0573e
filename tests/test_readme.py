"""README's Python example runs as written: its block, with the tiny model and a folder of test images."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.dataset as pads

from qwenbatch import schema
from tests.helpers import REPO, write_images

SETTINGS = ("MODEL", "IMAGES", "OUT")  # the block's first lines name what a reader changes; so does this test


def python_block() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example(tiny_model: Path, ray_local, tmp_path: Path):
    """As a user runs it on their own folder, where one file is cut short: that file is one error row."""
    images = write_images(tmp_path / "photos", 4, sizes=[(64, 64), (96, 64)])  # small: the CPU's model is slow
    whole = images[0].read_bytes()
    cut = tmp_path / "photos" / "cut.jpg"
    cut.write_bytes(whole[: len(whole) // 2])
    values = {"MODEL": str(tiny_model), "IMAGES": str(tmp_path / "photos"), "OUT": str(tmp_path / "captions")}
    code = python_block()
    for name, value in values.items():
        code, count = re.subn(rf'^{name} = "[^"]*"', f"{name} = {value!r}", code, flags=re.M)
        assert count == 1, f"README's example no longer sets {name} on a line of its own"
    exec(compile(code, "README.md", "exec"), {})
    rows = pads.dataset(values["OUT"], format="parquet").to_table().to_pylist()
    assert sorted(row["path"] for row in rows) == sorted(str(path) for path in [*images, cut])
    good = [row for row in rows if row["path"] != str(cut)]
    assert all(row["status"] == schema.OK and row["text"] is not None for row in good), rows
    (bad,) = [row for row in rows if row["path"] == str(cut)]
    assert bad["status"] == schema.LOAD_ERROR and bad["text"] is None, bad
    assert "Truncated" in bad["error"] or "truncated" in bad["error"], bad
    assert set(rows[0]) == {"path", "text", "status", "error"}
