"""Load stage (CPU): fetch bytes, guard, decode, orient, RGB, resize to the pixel budget."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from qwenbatch import schema
from qwenbatch.attempts import AttemptLedger, Guard, die_if_told
from qwenbatch.config import ConfigError
from qwenbatch.fetch import fetch
from qwenbatch.loaded import Loaded, Pages, Picture, Several, assemble
from qwenbatch.locations import LoadError, LoadLimits, check_location, is_uri, normalise_location
from qwenbatch.pdf import chosen_pages, is_pdf, opened, over_max_pages, render_page
from qwenbatch.rows import column_or_nulls

Image.MAX_IMAGE_PIXELS = None  # our own header check below is the bomb guard
EXIF_ORIENTATION = 0x0112
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
        images_column: str = schema.IMAGES,
        attempts: AttemptLedger | None = None,
    ) -> None:
        self.resize = Resizer(model, revision, limits)
        self.limits = limits
        self.image_column = image_column
        self.images_column = images_column
        self.id_column = id_column
        self.guard = Guard(attempts, "load")
        if limits.memory_mb is not None:
            self.resize(Image.new("RGB", (64, 64)), (32, 32))  # torch starts its threads before the cap
            limit_memory(limits.memory_mb)

    def __call__(self, batch: pa.Table) -> pa.Table | Iterator[pa.Table]:
        """Pixels, sizes, image_tokens, status and error for every row (a PDF: for each of its pages); never
        drops one.

        A block with PDFs in it goes on in parts, each PDF alone (Ray Data takes a generator's tables one by
        one): a document's pages are many images, so the actor holds one document's at a time, never a
        block's. The encoded bytes stay here: the driver's shard writer never receives raw images.
        """
        parts = self._parts(batch)
        if len(parts) <= 1:
            return self._load_part(batch)
        return (self._load_part(batch.slice(start, stop - start)) for start, stop in parts)

    def _load_part(self, batch: pa.Table) -> pa.Table:
        ids = [str(row) for row in column_or_nulls(batch, self.id_column)]
        keys = list(range(batch.num_rows))
        loaded = self.guard.run(keys, ids, lambda picked: self._load_rows(batch, ids, picked), died=_died)
        raw = [c for c in (schema.IMAGE_BYTES, self.image_column) if holds_pixels_or_bytes(batch, c)]
        results = [loaded[index] for index in keys]
        return assemble(batch.drop_columns(raw), results, self.id_column, self.resize.factor)

    def _parts(self, batch: pa.Table) -> list[tuple[int, int]]:
        """Row ranges: each row that looks like a PDF (its bytes, or a `.pdf` location) alone, the rows between
        together. A guess from what is at hand: it bounds memory, while the content decides what a row is."""
        images = image_values(batch, self.image_column)
        raw = column_or_nulls(batch, schema.IMAGE_BYTES)
        parts, start = [], 0
        for index, (image, data) in enumerate(zip(images, raw, strict=True)):
            data = image if isinstance(image, bytes) else data
            named = isinstance(image, str) and image.lower().endswith(".pdf")
            if (is_pdf(data) if data is not None else named) and batch.num_rows > 1:
                parts += [(start, index)] if start < index else []
                parts.append((index, index + 1))
                start = index + 1
        return parts + ([(start, batch.num_rows)] if start < batch.num_rows else [])

    def _load_rows(self, batch: pa.Table, ids: list[str], picked: list[int]) -> dict[int, Loaded]:
        """Each picked row's picture(s) or pages (pixels as bytes: the arrays freed at once), or the exception
        that made it a load_error."""
        images = image_values(batch, self.image_column)
        raw = column_or_nulls(batch, schema.IMAGE_BYTES)
        lists = column_or_nulls(batch, self.images_column)
        loaded: dict[int, Loaded] = {}
        for index in picked:
            image, data = images[index], raw[index]
            try:
                die_if_told("load", [ids[index]])
                if lists[index] is not None:
                    loaded[index] = self._load_several(lists[index])
                    continue
                if isinstance(image, bytes):  # encoded bytes in the image column itself
                    image, data = None, image
                if data is None and isinstance(image, np.ndarray):  # decoded already (`read_images`)
                    loaded[index] = Picture.of(load_array(image, self.limits, self.resize))
                    continue
                if data is None and not (isinstance(image, str) and image):
                    raise LoadError(f"row has neither {self.image_column!r} nor {schema.IMAGE_BYTES!r}")
                if data is None:
                    data = fetch_bytes(check_location(image, self.limits), self.limits)
                if is_pdf(data):
                    loaded[index] = self._load_pdf(data)
                else:
                    loaded[index] = Picture.of(load_image(data, self.limits, self.resize))
            except Exception as exc:  # noqa: BLE001 - one bad image is one row's error, never the job's
                loaded[index] = exc
        return loaded

    def _shared_budget(self, count: int) -> int:
        """Each image's pixel budget in a row of `count`: the run's, or less so that they fit the total."""
        budget = min(self.limits.max_pixels, self.limits.max_total_pixels // count)
        if budget < self.limits.min_pixels:
            raise LoadError(
                f"{count} images at image.min_pixels ({self.limits.min_pixels}) each are over "
                f"image.max_total_pixels ({self.limits.max_total_pixels})"
            )
        return budget

    def _load_several(self, values: list) -> Several:
        """The `images` list: each a location or encoded bytes; a failure names the image, 1-based."""
        if not values:
            raise LoadError(f"{self.images_column!r} is an empty list")
        budget = self._shared_budget(len(values))
        pictures = []
        for number, value in enumerate(values, 1):
            try:
                if value is None or value in ("", b""):
                    raise LoadError("it is null or empty")
                if isinstance(value, bytes):
                    data = value
                else:
                    data = fetch_bytes(check_location(value, self.limits), self.limits)
                if is_pdf(data):
                    raise LoadError("it is a PDF: give a PDF in the image column, one per row")
                pictures.append(Picture.of(load_image(data, self.limits, self.resize, budget)))
            except LoadError as exc:
                raise LoadError(f"image {number} of {len(values)}: {exc}") from None
        return Several(tuple(pictures))

    def _load_pdf(self, data: bytes) -> Pages | Several:
        """A row per chosen page (`pdf.mode` per_page), or all of them in one prompt (per_document)."""
        if schema.PDF_FORMAT not in self.limits.formats:
            raise LoadError(f"format PDF is not allowed (allowed: {', '.join(self.limits.formats)})")
        config = self.limits.pdf
        with opened(data) as document:
            numbers, left = chosen_pages(len(document), config)
            skipped = over_max_pages(left, len(document), config.max_pages) if left else None
            if config.mode == "per_document":
                if skipped is not None:
                    raise LoadError(f"pdf.mode per_document: {skipped}")
                budget = self._shared_budget(len(numbers))
                return Several(tuple(self._page(document, number, budget) for number in numbers))
            pages: list[tuple[int, Picture | Exception]] = []
            for number in numbers:
                try:
                    pages.append((number, self._page(document, number, self.limits.max_pixels)))
                except LoadError as exc:  # one bad page is that page's row
                    pages.append((number, exc))
        if skipped is not None:  # one row for the rest, under the first page not processed
            pages.append((left[0], LoadError(skipped)))
        return Pages(tuple(pages))

    def _page(self, document: object, number: int, budget: int) -> Picture:
        """Page `number` rendered at the budget, then resized exactly as the processor would."""
        image = render_page(document, number, budget, self.limits.max_source_pixels)
        return Picture.of(self.resize(image, self.resize.target(*image.size, budget)))


def _died() -> Exception:
    return LoadError(schema.WORKER_DIED_TWICE)
