"""Load stage (CPU): fetch bytes, guard, decode, orient, RGB, resize to the pixel budget."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from qwenbatch import schema
from qwenbatch.config import StorageConfig
from qwenbatch.rows import RowError, column_or_nulls, error_message, with_columns

Image.MAX_IMAGE_PIXELS = None  # our own header check below is the bomb guard


class LoadError(RowError):
    """A row-level failure in the load stage; its message becomes the row's `error`."""


@dataclass(frozen=True)
class LoadLimits:
    min_pixels: int
    max_pixels: int
    max_bytes: int = schema.DEFAULT_MAX_BYTES
    max_source_pixels: int = schema.DEFAULT_MAX_SOURCE_PIXELS
    formats: tuple[str, ...] = schema.DEFAULT_FORMATS
    fetch_timeout_s: float = schema.DEFAULT_FETCH_TIMEOUT_S
    fetch_retries: int = schema.DEFAULT_FETCH_RETRIES
    fetch_backoff_s: float = schema.DEFAULT_FETCH_BACKOFF_S
    max_redirects: int = schema.DEFAULT_MAX_REDIRECTS
    allow_private_network: bool = False
    storage: StorageConfig = StorageConfig()  # object-store endpoint and region, as the driver resolved them


def fetch_bytes(location: str, limits: LoadLimits) -> bytes:
    """Read a local image, refusing files over the byte limit before reading them; URIs go to `fetch`."""
    if "://" in location and not location.startswith("file://"):
        from qwenbatch.fetch import fetch  # it builds on this module

        return fetch(location, limits)
    path = location.removeprefix("file://")
    try:
        size = os.path.getsize(path)
        if size > limits.max_bytes:
            raise LoadError(f"image is {size} bytes, over the limit of {limits.max_bytes}")
        with open(path, "rb") as handle:
            return handle.read(limits.max_bytes + 1)
    except FileNotFoundError:
        raise LoadError(f"file not found: {location}") from None
    except IsADirectoryError:
        raise LoadError(f"is a directory, not an image: {location}") from None
    except PermissionError:
        raise LoadError(f"permission denied: {location}") from None


def decode(data: bytes, limits: LoadLimits) -> Image.Image:
    """Open from the header, check format and pixel count, and only then decode."""
    if not data:
        raise LoadError("empty file")
    if len(data) > limits.max_bytes:
        raise LoadError(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise LoadError("not a recognised image file") from None
    if image.format not in limits.formats:
        raise LoadError(f"format {image.format} is not allowed (allowed: {', '.join(limits.formats)})")
    width, height = image.size
    if width * height > limits.max_source_pixels:
        raise LoadError(
            f"image header claims {width}x{height} = {width * height} pixels, "
            f"over the limit of {limits.max_source_pixels} (decompression bomb guard)"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise LoadError(f"cannot decode {image.format}: {exc}") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB from any mode: EXIF rotation, CMYK, 16-bit, palette, alpha, grey."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        scale = 1 / 256 if image.mode.startswith("I;16") or np.asarray(image).max() > 255 else 1
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) * scale, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


class Resizer:
    """Resizes exactly as the checkpoint's own image processor would, so it need not resize again."""

    def __init__(self, model: str, revision: str | None, limits: LoadLimits) -> None:
        from transformers.image_utils import SizeDict

        from qwenbatch.hub import load_processor

        self.image_processor = load_processor(model, revision).image_processor
        self.factor = self.image_processor.patch_size * self.image_processor.merge_size
        self.size = SizeDict(shortest_edge=limits.min_pixels, longest_edge=limits.max_pixels)

    def __call__(self, image: Image.Image) -> np.ndarray:
        import torch

        chw = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).contiguous()
        try:
            resized = self.image_processor.resize(
                chw[None], size=self.size, resample=self.image_processor.resample, factor=self.factor
            )[0]
        except ValueError as exc:  # the model's own limit, e.g. aspect ratio over 200
            raise LoadError(f"the model cannot take a {image.width}x{image.height} image: {exc}") from None
        return resized.permute(1, 2, 0).contiguous().numpy()


def load_batch(batch: pa.Table, *, model: str, revision: str | None, limits: LoadLimits, image_column: str) -> pa.Table:
    """Add pixels, width, height, image_tokens, status and error for every row; never drop one."""
    resize = Resizer(model, revision, limits)
    locations = column_or_nulls(batch, image_column)
    raw = column_or_nulls(batch, schema.IMAGE_BYTES)
    pixels, widths, heights, tokens, statuses, errors = [], [], [], [], [], []
    for location, data in zip(locations, raw, strict=True):
        try:
            if data is None and not location:
                raise LoadError(f"row has neither {image_column!r} nor {schema.IMAGE_BYTES!r}")
            image = to_rgb(decode(data if data is not None else fetch_bytes(location, limits), limits))
            array = resize(image)
        except Exception as exc:  # noqa: BLE001 - one bad image is one row's error, never the job's
            pixels.append(None)
            widths.append(None)
            heights.append(None)
            tokens.append(None)
            statuses.append(schema.LOAD_ERROR)
            errors.append(error_message(exc))
            continue
        height, width = array.shape[:2]
        pixels.append(array.tobytes())
        widths.append(width)
        heights.append(height)
        tokens.append(width * height // (resize.factor * resize.factor))
        statuses.append(schema.OK)
        errors.append(None)
    return with_columns(
        batch,
        {
            schema.PIXELS: pa.array(pixels, pa.large_binary()),
            schema.WIDTH: pa.array(widths, pa.int32()),
            schema.HEIGHT: pa.array(heights, pa.int32()),
            schema.IMAGE_TOKENS: pa.array(tokens, pa.int32()),
            schema.STATUS: pa.array(statuses, pa.string()),
            schema.ERROR: pa.array(errors, pa.string()),
        },
    )


def pixels_to_array(data: bytes, width: int, height: int) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
