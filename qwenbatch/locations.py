"""Where rows may point: the load stage's limits, the row-level LoadError, and the prefix check.

The load stage and the remote fetchers both apply this policy (a fetcher checks every redirect
target again), so it lives here, below both of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from qwenbatch import schema
from qwenbatch.config import PdfConfig, StorageConfig
from qwenbatch.rows import RowError


class LoadError(RowError):
    """A row-level failure in the load stage; its message becomes the row's `error`."""


@dataclass(frozen=True)
class LoadLimits:
    min_pixels: int
    max_pixels: int
    allowed_prefixes: tuple[str, ...]  # normalised (see `load.allowed_roots`); rows elsewhere are never read
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
