"""PDFs in the load stage: open with pdfium, choose the pages, render each at the pixel budget.

A page is vector data with a size in points (1/72 inch), so it is rendered at the scale the pixel
budget allows, never larger: the model sees as many pixels as it would take from a photo, and a
poster-sized page costs no more memory than a letter. Every failure is a LoadError with a clear message:
the load stage turns a document-level one into one error row, a page-level one into that page's row.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from PIL import Image

from qwenbatch import schema
from qwenbatch.config import PdfConfig
from qwenbatch.locations import LoadError

# pdfium's FPDF_GetLastError codes for a failed open: a password is needed, or an unsupported security handler.
ERR_PASSWORD, ERR_SECURITY = 4, 5


def is_pdf(data: bytes) -> bool:
    """The content decides, never the name: a `%PDF-` header where PDF readers look for it."""
    return b"%PDF-" in data[: schema.PDF_HEADER_WITHIN]


def _open_error(data: bytes, code: int) -> LoadError:
    if code in (ERR_PASSWORD, ERR_SECURITY):
        return LoadError("PDF is encrypted (it needs a password); decrypt it first")
    if b"%%EOF" not in data[-2048:]:
        return LoadError("cannot open PDF: the file is truncated (no end-of-file marker)")
    return LoadError("cannot open PDF: the file is corrupt (not a readable PDF structure)")


@contextmanager
def opened(data: bytes) -> Iterator[Any]:
    """The document, closed on leaving; a LoadError naming why it cannot be read.

    Opened through pdfium's own call: pypdfium2's wrapper treats a document without pages as a failed open
    and reports pdfium's last error, which a previous document may have left.
    """
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    raw = pdfium_c.FPDF_LoadMemDocument64(data, len(data), None)  # read in place: `data` lives as long as this
    if not raw:
        raise _open_error(data, pdfium_c.FPDF_GetLastError())
    document = pdfium.PdfDocument(raw)
    try:
        if len(document) == 0:
            raise LoadError("PDF has no pages")
        yield document
    finally:
        document.close()


def chosen_pages(count: int, config: PdfConfig) -> tuple[list[int], list[int]]:
    """The page numbers (1-based) to process, and those wanted but over `pdf.max_pages`.

    `pdf.pages` picks (all, the first, a list); `pdf.max_pages` bounds what is left, the first pages first.
    """
    if config.pages == "all":
        wanted = list(range(1, count + 1))
    elif config.pages == "first":
        wanted = [1]
    else:
        wanted = [number for number in config.pages if number <= count]
        if not wanted:
            raise LoadError(f"PDF has {count} pages; none of the pages asked for ({_listed(config.pages)})")
    return wanted[: config.max_pages], wanted[config.max_pages :]


def over_max_pages(left: list[int], count: int, max_pages: int) -> str:
    pages = f"{len(left)} more page{'s' if len(left) > 1 else ''} ({_listed(left)})"
    return f"{pages} of this {count}-page PDF not processed: over pdf.max_pages ({max_pages})"


def _listed(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:5])
    return shown + (f", ... {numbers[-1]}" if len(numbers) > 5 else "")


def render_scale(width_pt: float, height_pt: float, max_pixels: int) -> float:
    """Pixels per point that fill the pixel budget: the resolution the budget allows, no more."""
    return math.sqrt(max_pixels / (width_pt * height_pt))


def render_page(document: Any, number: int, max_pixels: int, max_source_pixels: int) -> Image.Image:
    """Page `number` (1-based) as RGB, rendered at the budget, on white.

    A page whose size at 72 dpi (one pixel a point, what it claims before any scaling) or whose render
    would exceed `image.max_source_pixels` is refused, as an image header claiming as much would be.
    """
    import pypdfium2 as pdfium

    page = document[number - 1]
    try:
        width_pt, height_pt = page.get_size()
        if not (width_pt > 0 and height_pt > 0):
            raise LoadError(f"page {number} has no size ({width_pt:g}x{height_pt:g} pt)")
        if width_pt * height_pt > max_source_pixels:
            raise LoadError(
                f"page {number} is {width_pt:.0f}x{height_pt:.0f} pt = {width_pt * height_pt:.0f} pixels at 72 dpi, "
                f"over the limit of {max_source_pixels} (image.max_source_pixels)"
            )
        scale = render_scale(width_pt, height_pt, max_pixels)
        width, height = math.ceil(width_pt * scale), math.ceil(height_pt * scale)  # as pdfium sizes its bitmap
        if width * height > max_source_pixels:
            raise LoadError(
                f"page {number} would render at {width}x{height} = {width * height} pixels, "
                f"over the limit of {max_source_pixels} (image.max_source_pixels)"
            )
        try:
            bitmap = page.render(scale=scale, fill_color=(255, 255, 255, 255))
        except pdfium.PdfiumError as exc:
            raise LoadError(f"cannot render page {number}: {exc}") from None
        return bitmap.to_pil().convert("RGB")
    finally:
        page.close()
