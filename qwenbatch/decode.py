"""Image bytes to the model's pixels: fetch, guard, decode, orient, RGB, resize as the checkpoint's processor would.

The load stage runs these per row; the HTML report reuses the first steps to draw thumbnails.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

from qwenbatch.fetch import fetch
from qwenbatch.locations import LoadError, LoadLimits, is_uri

Image.MAX_IMAGE_PIXELS = None  # our own header check below is the bomb guard
EXIF_ORIENTATION = 0x0112
ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # the orientations that swap width and height


def fetch_bytes(location: str, limits: LoadLimits) -> bytes:
    """Read a local image, refusing files over the byte limit before reading them; URIs go to `fetch`."""
    if is_uri(location):
        return fetch(location, limits)
    path = location.removeprefix("file://")
    try:
        size = os.path.getsize(path)
        if size > limits.max_bytes:
            raise LoadError(f"image is {size} bytes, over the limit of {limits.max_bytes}")
        with open(path, "rb") as handle:
            return handle.read(limits.max_bytes + 1)
    except FileNotFoundError:
        raise LoadError("file not found") from None
    except IsADirectoryError:
        raise LoadError("is a directory, not an image") from None
    except PermissionError:
        raise LoadError("permission denied") from None


def open_checked(data: bytes, limits: LoadLimits) -> Image.Image:
    """Open from the header only, and check size, format and pixel count before any decoding."""
    if not data:
        raise LoadError("empty file")
    if len(data) > limits.max_bytes:
        raise LoadError(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise LoadError("not a recognised image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # a header cut short or corrupt
        raise LoadError(f"cannot read the image header: {exc}") from None
    if image.format not in limits.formats:
        raise LoadError(f"format {image.format} is not allowed (allowed: {', '.join(limits.formats)})")
    width, height = image.size
    if width * height > limits.max_source_pixels:
        raise LoadError(
            f"image header claims {width}x{height} = {width * height} pixels, "
            f"over the limit of {limits.max_source_pixels} (decompression bomb guard)"
        )
    return image


def _load_pixels(image: Image.Image) -> None:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise LoadError(f"cannot decode {image.format}: {exc}") from None


def decode(data: bytes, limits: LoadLimits) -> Image.Image:
    """Check the header, then decode at full size."""
    image = open_checked(data, limits)
    _load_pixels(image)
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
        from qwenbatch.hub import load_processor

        self.image_processor = load_processor(model, revision).image_processor
        self.factor = self.image_processor.patch_size * self.image_processor.merge_size
        self.min_pixels = limits.min_pixels
        self.max_pixels = limits.max_pixels

    def target(self, width: int, height: int, max_pixels: int | None = None) -> tuple[int, int]:
        """(width, height) the model's rounding gives an image of this size: multiples of the patch.

        `max_pixels`: a smaller budget than the run's, for one of several images that share a total.
        """
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        budget = max_pixels or self.max_pixels
        try:
            new_height, new_width = smart_resize(
                height, width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=budget
            )
        except ValueError as exc:  # the model's own limit, e.g. aspect ratio over 200
            raise LoadError(f"the model cannot take a {width}x{height} image: {exc}") from None
        return new_width, new_height

    def __call__(self, image: Image.Image, target: tuple[int, int]) -> np.ndarray:
        import torch
        from transformers.image_processing_backends import TorchvisionBackend
        from transformers.image_utils import SizeDict

        chw = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # np.array: a writable copy, as the processor makes
        width, height = target
        # The processor's own resize step after its size rounding: same kernel, same antialiasing.
        resized = TorchvisionBackend.resize(
            self.image_processor,
            chw[None],
            SizeDict(height=height, width=width),
            resample=self.image_processor.resample,
        )[0]
        return resized.permute(1, 2, 0).contiguous().numpy()


def load_image(data: bytes, limits: LoadLimits, resize: Resizer, max_pixels: int | None = None) -> np.ndarray:
    """Decode, orient, convert and resize one image to what the model will see.

    The target size comes from the original (oriented) size, so a JPEG decoded at reduced
    size with `jpeg_draft` still lands on the same target as a full decode.
    """
    image = open_checked(data, limits)
    stored = image.size
    try:
        return _decode_and_resize(image, limits, resize, max_pixels)
    except MemoryError:  # over the load actor's cap (`limit_memory`)
        raise LoadError(
            f"decoding this {stored[0]}x{stored[1]} image needs more memory than a load actor may use "
            f"({limits.memory_mb} MiB, run.load_memory_mb)"
        ) from None


def _decode_and_resize(image: Image.Image, limits: LoadLimits, resize: Resizer, max_pixels: int | None) -> np.ndarray:
    stored = image.size
    try:  # PNG keeps EXIF after the pixels, so reading it decodes them: a corrupt file fails here
        swapped = image.getexif().get(EXIF_ORIENTATION, 1) in ROTATED_ORIENTATIONS
    except (OSError, SyntaxError, ValueError) as exc:
        raise LoadError(f"cannot decode {image.format}: {exc}") from None
    target = resize.target(*(stored[::-1] if swapped else stored), max_pixels)
    if limits.jpeg_draft and image.format == "JPEG":
        image.draft("RGB", resize.target(*stored, max_pixels))  # the decoder's DCT scaling: 1/2, 1/4 or 1/8
    _load_pixels(image)
    return resize(to_rgb(image), target)


def load_array(array: np.ndarray, limits: LoadLimits, resize: Resizer) -> np.ndarray:
    """An image already decoded (what Ray Data's `read_images` yields): no decoding, but the pixel guard,
    the RGB conversion and the resize a decoded file gets, so the model sees the same pixels."""
    if array.dtype != np.uint8:
        raise LoadError(f"image array must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[0] == 1 and array.shape[2] not in (1, 3, 4):
        array = array[0]  # a grey HxW image in a block of colour ones: Ray Data pads it to 1xHxW
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise LoadError(f"image array must be HxW, HxWx3 or HxWx4 pixels, got shape {array.shape}")
    height, width = array.shape[:2]
    if width * height > limits.max_source_pixels:
        raise LoadError(
            f"image array is {width}x{height} = {width * height} pixels, "
            f"over the limit of {limits.max_source_pixels} (decompression bomb guard)"
        )
    target = resize.target(width, height)
    return resize(to_rgb(Image.fromarray(np.ascontiguousarray(array))), target)
