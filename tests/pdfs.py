"""Real PDF files for the tests: multi-page documents of varied page sizes, and broken ones.

Pages are drawn with Pillow and saved as a PDF by Pillow's own writer (one page per image, at 72 dpi, so
a WxH image is a WxH-point page). The encrypted PDF is written here byte by byte with the PDF standard
security handler (revision 2, RC4 40-bit, user password `secret`): pdfium opens it with that password.
"""

from __future__ import annotations

import hashlib
import io
import struct

from PIL import Image, ImageDraw

from tests.helpers import noise_image

PASSWORD = b"secret"
# The padding string of the standard security handler (PDF 32000-1, 7.6.3.3).
PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def page_image(width: int, height: int, seed: int, text: str) -> Image.Image:
    """A page: noise blocks behind a white box with a line of text, so pages differ and carry text."""
    image = noise_image(width, height, seed)
    draw = ImageDraw.Draw(image)
    draw.rectangle([4, 4, min(width - 4, 200), min(height - 4, 24)], fill=(255, 255, 255))
    draw.text((8, 8), text, fill=(0, 0, 0))
    return image


def make_pdf(sizes: list[tuple[int, int]], seed: int = 0, label: str = "page") -> bytes:
    """A PDF with one page per size (in points), each page different."""
    pages = [page_image(w, h, seed * 100 + i, f"{label} {i + 1}") for i, (w, h) in enumerate(sizes)]
    buffer = io.BytesIO()
    pages[0].save(buffer, format="PDF", save_all=True, append_images=pages[1:], resolution=72.0)
    return buffer.getvalue()


def zero_page_pdf() -> bytes:
    """A valid PDF whose page tree is empty, as pdfium itself writes a new document without pages."""
    import pypdfium2 as pdfium

    buffer = io.BytesIO()
    pdfium.PdfDocument.new().save(buffer)
    return buffer.getvalue()


def truncated_pdf(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def corrupt_pdf(data: bytes) -> bytes:
    """A whole PDF whose body (objects and cross-reference table) is overwritten with junk: header and end kept."""
    keep = 16
    return data[:keep] + bytes((i * 37) % 256 for i in range(len(data) - 2 * keep)) + data[-keep:]


def _rc4(key: bytes, data: bytes) -> bytes:
    state = list(range(256))
    j = 0
    for i in range(256):
        j = (j + state[i] + key[i % len(key)]) % 256
        state[i], state[j] = state[j], state[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + state[i]) % 256
        state[i], state[j] = state[j], state[i]
        out.append(byte ^ state[(state[i] + state[j]) % 256])
    return bytes(out)


def _padded(password: bytes) -> bytes:
    return (password + PAD)[:32]


def encrypted_pdf(user: bytes = PASSWORD, owner: bytes = b"owner") -> bytes:
    """A one-page PDF encrypted with the standard security handler, revision 2 (RC4, 40-bit key)."""
    file_id = hashlib.md5(b"qwenbatch test").digest()
    permissions = -4
    owner_key = hashlib.md5(_padded(owner)).digest()[:5]
    o_value = _rc4(owner_key, _padded(user))
    key = hashlib.md5(_padded(user) + o_value + struct.pack("<i", permissions) + file_id).digest()[:5]
    u_value = _rc4(key, PAD)

    def encrypt(number: int, data: bytes) -> bytes:
        object_key = hashlib.md5(key + struct.pack("<I", number)[:3] + b"\0\0").digest()[:10]
        return _rc4(object_key, data)

    content = encrypt(4, b"BT /F1 24 Tf 72 720 Td (Confidential) Tj ET")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P %d >>"
        % (o_value.hex().encode(), u_value.hex().encode(), permissions),  # fmt: skip
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    identifier = file_id.hex().encode()
    out += b"trailer\n<< /Size %d /Root 1 0 R /Encrypt 6 0 R /ID [<%s> <%s>] >>\n" % (
        len(objects) + 1,
        identifier,
        identifier,
    )
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)
