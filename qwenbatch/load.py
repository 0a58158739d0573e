"""Load stage (CPU): each row's image, images or PDF pages, through `decode`; a bad one is that row's error."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from PIL import Image

from qwenbatch import schema
from qwenbatch.attempts import AttemptLedger, Guard, die_if_told
from qwenbatch.decode import Resizer, fetch_bytes, load_array, load_image
from qwenbatch.loaded import Loaded, Pages, Picture, Several, assemble
from qwenbatch.locations import LoadError, LoadLimits, check_location
from qwenbatch.pdf import chosen_pages, is_pdf, opened, over_max_pages, render_page
from qwenbatch.rows import column_or_nulls


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
