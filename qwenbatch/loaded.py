"""What the load stage makes of a row, and the table it hands on: one row per image row, one per PDF page.

A row loads to one picture, several pictures (the `images` column, or a PDF's pages in one prompt),
the pages of a PDF (one output row each), or the exception that makes it a `load_error`. A PDF's page
rows get the ids `<id>#p<page>`, the `page` column, and two internal columns, the document's id and its
row count, by which the writer keeps a document's rows together in one shard (`documents.DocumentGate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from qwenbatch import schema
from qwenbatch.rows import column_or_nulls, error_message, with_columns


@dataclass(frozen=True)
class Picture:
    """One image as the model will see it: RGB uint8 pixels, row-major, at its resized size."""

    pixels: bytes
    width: int
    height: int

    @classmethod
    def of(cls, array: np.ndarray) -> Picture:
        return cls(array.tobytes(), array.shape[1], array.shape[0])


@dataclass(frozen=True)
class Several:
    """Images for one prompt, in order."""

    pictures: tuple[Picture, ...]


@dataclass(frozen=True)
class Pages:
    """A PDF's pages, each its own output row: (page number, its picture or why it failed)."""

    pages: tuple[tuple[int, Picture | Exception], ...]


Loaded = Picture | Several | Pages | Exception


def page_id(document: str, page: int) -> str:
    return f"{document}{schema.PAGE_ID_SEPARATOR}{page}"


def _tokens(picture: Picture, factor: int) -> int:
    return picture.width * picture.height // (factor * factor)


def assemble(batch: pa.Table, results: list[Loaded], id_column: str, factor: int) -> pa.Table:
    """The rows going on: each input row once, or once per page; pixels, sizes, tokens, status and error.

    The id column is written as text (a page's id is `<id>#p<page>`, text whatever the manifest's type).
    """
    ids = [None if value is None else str(value) for value in column_or_nulls(batch, id_column)]
    take: list[int] = []
    out: dict[str, list[Any]] = {name: [] for name in ("id", "pixels", "w", "h", "sizes", "tokens", "status", "error")}
    out |= {"page": [], "document": [], "document_rows": []}

    def add(index: int, result: Picture | Several | Exception, page: int | None = None, rows: int = 0) -> None:
        take.append(index)
        out["id"].append(ids[index] if page is None else page_id(str(ids[index]), page))
        out["page"].append(page)
        out["document"].append(None if page is None else ids[index])
        out["document_rows"].append(None if page is None else rows)
        if isinstance(result, Exception):
            values: tuple[Any, ...] = (None, None, None, None, None, schema.LOAD_ERROR, error_message(result))
        elif isinstance(result, Several):
            pictures = result.pictures
            sizes = [n for p in pictures for n in (p.width, p.height)]
            pixels = b"".join(p.pixels for p in pictures)
            values = (pixels, None, None, sizes, sum(_tokens(p, factor) for p in pictures), schema.OK, None)
        else:
            values = (result.pixels, result.width, result.height, None, _tokens(result, factor), schema.OK, None)
        for name, value in zip(("pixels", "w", "h", "sizes", "tokens", "status", "error"), values, strict=True):
            out[name].append(value)

    for index, result in enumerate(results):
        if isinstance(result, Pages):
            for number, page in result.pages:
                add(index, page, number, len(result.pages))
        else:
            add(index, result)
    table = batch.take(pa.array(take, pa.int64())) if take != list(range(batch.num_rows)) else batch
    if schema.IMAGE_BYTES in table.column_names:
        table = table.drop_columns([schema.IMAGE_BYTES])
    columns = {
        id_column: pa.array(out["id"], pa.string()),
        schema.PIXELS: pa.array(out["pixels"], pa.large_binary()),
        schema.WIDTH: pa.array(out["w"], pa.int32()),
        schema.HEIGHT: pa.array(out["h"], pa.int32()),
        schema.SIZES: pa.array(out["sizes"], pa.list_(pa.int32())),
        schema.IMAGE_TOKENS: pa.array(out["tokens"], pa.int32()),
        schema.STATUS: pa.array(out["status"], pa.string()),
        schema.ERROR: pa.array(out["error"], pa.string()),
        schema.PAGE: pa.array(out["page"], pa.int32()),
        schema.DOCUMENT: pa.array(out["document"], pa.string()),
        schema.DOCUMENT_ROWS: pa.array(out["document_rows"], pa.int32()),
    }
    return with_columns(table, columns)


def image_count(sizes: list[int] | None) -> int:
    """How many images a row holds: one, or as many as its sizes list."""
    return 1 if sizes is None else len(sizes) // 2


def row_images(pixels: bytes, width: int | None, height: int | None, sizes: list[int] | None) -> Any:
    """The row's images as the processor takes them (CHW uint8 tensors): one, or a list of several."""
    import torch

    def tensor(data: bytes | memoryview, w: int, h: int) -> Any:
        return torch.from_numpy(pixels_to_array(data, w, h).copy()).permute(2, 0, 1)

    if sizes is None:
        assert width is not None and height is not None
        return tensor(pixels, width, height)
    images, offset, view = [], 0, memoryview(pixels)
    for w, h in zip(sizes[0::2], sizes[1::2], strict=True):
        images.append(tensor(view[offset : offset + w * h * 3], w, h))
        offset += w * h * 3
    return images


def flat_images(images: list[Any]) -> list[Any]:
    """One list of images for a batch, in prompt order, from each row's image or list of images."""
    return [image for item in images for image in (item if isinstance(item, list) else [item])]


def pixels_to_array(data: bytes | memoryview, width: int, height: int) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
