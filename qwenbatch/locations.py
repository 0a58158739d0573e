"""Where rows may point: the load stage's limits, the row-level LoadError, and the prefix check.

The load stage and the remote fetchers both apply this policy (a fetcher checks every redirect
target again), so it lives here, below both of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from qwenbatch import schema
from qwenbatch.config import ConfigError, PdfConfig, StorageConfig
from qwenbatch.rows import RowError


class LoadError(RowError):
    """A row-level failure in the load stage; its message becomes the row's `error`."""


@dataclass(frozen=True)
class LoadLimits:
    min_pixels: int
    max_pixels: int
    allowed_prefixes: tuple[str, ...]  # normalised (see `allowed_roots`); rows elsewhere are never read
    max_bytes: int = schema.DEFAULT_MAX_BYTES
    max_source_pixels: int = schema.DEFAULT_MAX_SOURCE_PIXELS
    formats: tuple[str, ...] = schema.DEFAULT_FORMATS
    fetch_timeout_s: float = schema.DEFAULT_FETCH_TIMEOUT_S
    fetch_retries: int = schema.DEFAULT_FETCH_RETRIES
    fetch_backoff_s: float = schema.DEFAULT_FETCH_BACKOFF_S
    max_redirects: int = schema.DEFAULT_MAX_REDIRECTS
    allow_private_network: bool = False
    storage: StorageConfig = StorageConfig()  # object-store endpoint and region, as the driver resolved them
    jpeg_draft: bool = False
    memory_mb: int | None = None  # what a load actor may take beyond its start (`load.limit_memory`); None: no limit
    max_total_pixels: int = schema.DEFAULT_MAX_TOTAL_PIXELS  # a row's several images together
    pdf: PdfConfig = field(default_factory=PdfConfig)  # which pages of a PDF, and a row per page or per document


def is_uri(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def normalise_location(location: str) -> str:
    """The canonical form the prefix check compares: what will really be read, not what the row says.

    Local paths are made absolute with `..` and symlinks resolved. URIs get a lower-case scheme and
    host (user info dropped); a `.` or `..` segment, raw or percent-encoded, is refused outright
    because object stores keep it literally while web servers resolve it.
    """
    if not is_uri(location):
        return os.path.realpath(location.removeprefix("file://"))
    if "\\" in location:
        raise LoadError("location contains a backslash")
    parts = urlsplit(location)
    if any(segment in (".", "..") for segment in unquote(parts.path).split("/")):
        raise LoadError("location has a '.' or '..' path segment")
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        raise LoadError("location has an invalid port") from None
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme.lower()}://{parts.hostname or ''}{port}{parts.path}{query}"


def is_under(normal: str, prefix: str) -> bool:
    """Prefix match on whole path segments: `/data/a` holds `/data/a/x.jpg` but not `/data/ab.jpg`."""
    if prefix.endswith("/"):
        return normal.startswith(prefix)
    return normal == prefix or normal.startswith(prefix + "/")


def check_location(location: str, limits: LoadLimits) -> str:
    """The location to read if it lies under an allowed prefix; a LoadError, before any I/O, if not.

    Remote fetchers call this again for every redirect target.
    """
    normal = normalise_location(location)
    if not any(is_under(normal, prefix) for prefix in limits.allowed_prefixes):
        shown = ", ".join(limits.allowed_prefixes[:3]) + (", ..." if len(limits.allowed_prefixes) > 3 else "")
        raise LoadError(f"location is outside image.allowed_prefixes ({shown or 'none'})")
    return location if is_uri(location) else normal


def allowed_roots(prefixes: tuple[str, ...] | None, manifests: list[str]) -> tuple[str, ...]:
    """Normalised allowed prefixes; by default the folders the manifests live in, and below them.

    Runs once on the driver. A manifest location is a file (its folder counts), a folder, or a glob
    (the folder before the first wildcard counts).
    """
    if prefixes is not None:
        return tuple(_normalise_root(prefix, "image.allowed_prefixes") for prefix in prefixes)
    roots = []
    for location in manifests:
        wildcard = min((location.index(c) for c in "*?[" if c in location), default=None)
        if wildcard is not None:
            roots.append(_normalise_root(location[:wildcard].rsplit("/", 1)[0] or "/", "input.path"))
        elif _is_file(location):
            roots.append(_normalise_root(location, "input.path").rsplit("/", 1)[0] or "/")
        else:
            roots.append(_normalise_root(location, "input.path"))
    return tuple(dict.fromkeys(roots))


def _normalise_root(location: str, key: str) -> str:
    try:
        return normalise_location(location)
    except LoadError as exc:
        raise ConfigError(f"{key}: {location}: {exc}") from None


def _is_file(location: str) -> bool:
    from pyarrow.fs import FileType

    from qwenbatch.storage import resolve

    try:
        fs, path = resolve(location)
        return fs.get_file_info(path).type == FileType.File
    except (OSError, ValueError):
        return False


def check_locations(locations: list[str], allowed: tuple[str, ...]) -> None:
    """Before a run: when none of a sample of its rows lies under the allowed prefixes, that is the config's
    problem, not each row's, so it is one ConfigError naming the folders to allow, not a run of load errors.

    Some rows outside stay those rows' load errors: a manifest may mix in a few it must not read.
    """
    outside = []
    for location in locations:
        try:
            normal = normalise_location(location)
        except LoadError:
            return  # a malformed location is its row's error
        if any(is_under(normal, prefix) for prefix in allowed):
            return
        outside.append(normal)
    if not outside:
        return
    folders = list(dict.fromkeys(location.rsplit("/", 1)[0] or "/" for location in outside))
    local = [folder for folder in folders if not is_uri(folder)]
    if len(local) == len(folders) and len(folders) > 1 and os.path.commonpath(folders) != "/":
        folders = [os.path.commonpath(folders)]
    shown = ", ".join(folders[:3]) + (", ..." if len(folders) > 3 else "")
    raise ConfigError(
        f"image.allowed_prefixes: the manifest's images lie outside the folders rows may read "
        f"({', '.join(allowed) or 'none'}): allow them with image.allowed_prefixes=[{shown}], or make the "
        f"manifest with `qwenbatch manifest FOLDER OUT.parquet`, which records its folder"
    )
