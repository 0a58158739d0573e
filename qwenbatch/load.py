"""Load stage (CPU): fetch bytes, guard, decode, orient, RGB, resize to the pixel budget."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from qwenbatch import schema
from qwenbatch.attempts import AttemptLedger, Guard, die_if_told
from qwenbatch.config import ConfigError
from qwenbatch.fetch import fetch
from qwenbatch.locations import LoadError, LoadLimits, check_location, is_uri, normalise_location
from qwenbatch.rows import column_or_nulls, error_message, with_columns

Image.MAX_IMAGE_PIXELS = None  # our own header check below is the bomb guard
EXIF_ORIENTATION = 0x0112
Loaded = tuple[bytes, int, int]  # a row's RGB pixels, width, height
ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # the orientations that swap width and height


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

    def target(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the model's rounding gives an image of this size: multiples of the patch."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        try:
            new_height, new_width = smart_resize(
                height, width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
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


def load_image(data: bytes, limits: LoadLimits, resize: Resizer) -> np.ndarray:
    """Decode, orient, convert and resize one image to what the model will see.

    The target size comes from the original (oriented) size, so a JPEG decoded at reduced
    size with `jpeg_draft` still lands on the same target as a full decode.
    """
    image = open_checked(data, limits)
    stored = image.size
    try:
        return _decode_and_resize(image, limits, resize)
    except MemoryError:  # over the load actor's cap (`limit_memory`)
        raise LoadError(
            f"decoding this {stored[0]}x{stored[1]} image needs more memory than a load actor may use "
            f"({limits.memory_mb} MiB, run.load_memory_mb)"
        ) from None


def _decode_and_resize(image: Image.Image, limits: LoadLimits, resize: Resizer) -> np.ndarray:
    stored = image.size
    try:  # PNG keeps EXIF after the pixels, so reading it decodes them: a corrupt file fails here
        swapped = image.getexif().get(EXIF_ORIENTATION, 1) in ROTATED_ORIENTATIONS
    except (OSError, SyntaxError, ValueError) as exc:
        raise LoadError(f"cannot decode {image.format}: {exc}") from None
    target = resize.target(*(stored[::-1] if swapped else stored))
    if limits.jpeg_draft and image.format == "JPEG":
        image.draft("RGB", resize.target(*stored))  # the decoder's DCT scaling: 1/2, 1/4 or 1/8
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


def image_values(batch: pa.Table, column: str) -> list[object]:
    """The image column's values: locations, encoded bytes, or decoded arrays (Ray Data's tensor columns)."""
    if column not in batch.column_names:
        return [None] * batch.num_rows
    values = batch.column(column)
    if not isinstance(values.type, pa.ExtensionType):
        return values.to_pylist()
    arrays: list[object] = []
    for chunk in values.chunks:  # Ray's fixed- and variable-shape tensor arrays, and pyarrow's own
        to_numpy = getattr(chunk, "to_numpy_ndarray", None) or (lambda c=chunk: c.to_numpy(zero_copy_only=False))
        arrays.extend(to_numpy())
    return arrays


def holds_pixels_or_bytes(batch: pa.Table, column: str) -> bool:
    """Whether a column holds images themselves (bytes or arrays), which the output does not carry."""
    if column not in batch.column_names:
        return False
    kind = batch.schema.field(column).type
    return isinstance(kind, pa.ExtensionType) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def limit_memory(extra_mb: int) -> None:
    """Cap this process's private memory at what it holds now plus `extra_mb`.

    RLIMIT_DATA counts the heap and private anonymous mappings, not Ray's shared object store, so a
    decode that needs more fails with MemoryError, that row's load_error, where the OOM killer would
    have taken the whole actor (and Ray would have retried its batch). Thread stacks count too: call
    it once the process has started its threads.
    """
    import resource

    with open("/proc/self/status") as status:
        held_kb = next(int(line.split()[1]) for line in status if line.startswith("VmData:"))
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = held_kb * 1024 + extra_mb * 2**20
    resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


class Loader:
    """The load stage as a CPU actor that holds the checkpoint's image processor.

    Its own actor pool keeps decoding a separate operator: Ray Data would fuse a task stage
    into the GPU actor, and then the GPU would wait on PIL.
    """

    def __init__(
        self,
        *,
        model: str,
        revision: str | None,
        limits: LoadLimits,
        image_column: str,
        id_column: str = schema.ID,
        attempts: AttemptLedger | None = None,
    ) -> None:
        self.resize = Resizer(model, revision, limits)
        self.limits = limits
        self.image_column = image_column
        self.id_column = id_column
        self.guard = Guard(attempts, "load")
        if limits.memory_mb is not None:
            self.resize(Image.new("RGB", (64, 64)), (32, 32))  # torch starts its threads before the cap
            limit_memory(limits.memory_mb)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Add pixels, width, height, image_tokens, status and error for every row; never drop one.

        The encoded bytes stay here: the rows go on with their pixels, and the driver's shard writer
        never receives raw images it would only drop.
        """
        ids = [str(row) for row in column_or_nulls(batch, self.id_column)]
        keys = list(range(batch.num_rows))
        loaded = self.guard.run(keys, ids, lambda picked: self._load_rows(batch, ids, picked), died=_died)
        pixels, widths, heights, tokens, statuses, errors = [], [], [], [], [], []
        for index in keys:
            result = loaded[index]
            if isinstance(result, Exception):
                pixels.append(None)
                widths.append(None)
                heights.append(None)
                tokens.append(None)
                statuses.append(schema.LOAD_ERROR)
                errors.append(error_message(result))
                continue
            data, width, height = result
            pixels.append(data)
            widths.append(width)
            heights.append(height)
            tokens.append(width * height // (self.resize.factor * self.resize.factor))
            statuses.append(schema.OK)
            errors.append(None)
        raw = [c for c in (schema.IMAGE_BYTES, self.image_column) if holds_pixels_or_bytes(batch, c)]
        batch = batch.drop_columns(raw)
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

    def _load_rows(self, batch: pa.Table, ids: list[str], picked: list[int]) -> dict[int, Loaded | Exception]:
        """Each picked row's pixels (as bytes: the array freed at once), or the exception that made it a load_error."""
        images = image_values(batch, self.image_column)
        raw = column_or_nulls(batch, schema.IMAGE_BYTES)
        loaded: dict[int, Loaded | Exception] = {}
        for index in picked:
            image, data = images[index], raw[index]
            try:
                if isinstance(image, bytes):  # encoded bytes in the image column itself
                    image, data = None, image
                if data is None and isinstance(image, str) and image:
                    data = fetch_bytes(check_location(image, self.limits), self.limits)
                if data is None and not isinstance(image, np.ndarray):
                    raise LoadError(f"row has neither {self.image_column!r} nor {schema.IMAGE_BYTES!r}")
                die_if_told("load", [ids[index]])
                if data is None:
                    array = load_array(image, self.limits, self.resize)
                else:
                    array = load_image(data, self.limits, self.resize)
                loaded[index] = (array.tobytes(), array.shape[1], array.shape[0])
            except Exception as exc:  # noqa: BLE001 - one bad image is one row's error, never the job's
                loaded[index] = exc
        return loaded


def _died() -> Exception:
    return LoadError(schema.WORKER_DIED_TWICE)


def pixels_to_array(data: bytes, width: int, height: int) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
