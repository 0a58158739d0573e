"""`qwenbatch manifest`: a manifest for a folder of images, so that a plain archive can be a job's input."""

from __future__ import annotations

import pyarrow as pa

from qwenbatch import schema, storage
from qwenbatch.inputs import ManifestError
from qwenbatch.locations import normalise_location


def build_manifest(location: str) -> pa.Table:
    """One row per image file under a local folder or an object-store prefix, at any depth.

    The id is the path relative to the folder: stable across runs and machines, and unique.
    Hidden files and folders (a leading dot) are skipped; so is anything without an image suffix.
    """
    fs, root = storage.resolve(location)
    scheme, _ = storage.split_uri(location)
    prefix = f"{scheme}://" if scheme not in ("", "file") else ""
    try:
        entries = storage.list_files(fs, root, schema.IMAGE_SUFFIXES, skip=(".",))
    except OSError as exc:
        raise ManifestError(f"{location}: {' '.join(str(exc).split())}") from None
    if not entries:
        raise ManifestError(f"{location}: no image files ({', '.join(schema.IMAGE_SUFFIXES)}) found")
    ids = [entry.path[len(root) :].lstrip("/") or entry.base_name for entry in entries]
    table = pa.table(
        {
            schema.ID: pa.array(ids, pa.string()),
            schema.IMAGE: pa.array([prefix + entry.path for entry in entries], pa.string()),
            schema.SIZE: pa.array([entry.size for entry in entries], pa.int64()),
        }
    )
    # The folder walked, as the prefix check compares it: a run over this manifest may read there
    # (`preflight.with_recorded_roots`) wherever the manifest itself is written.
    walked = normalise_location(prefix + root if prefix else root)
    return table.replace_schema_metadata({schema.MANIFEST_ROOT_KEY: walked.encode()})


def write_manifest(location: str, output: str) -> pa.Table:
    """Build the manifest and write it as one Parquet file, atomically (local or object store)."""
    table = build_manifest(location)
    fs, path = storage.resolve(output)
    storage.write_parquet_atomic(fs, path, table)
    return table
