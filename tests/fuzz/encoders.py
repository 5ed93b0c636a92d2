"""Building blocks of the fuzz corpus: the case record and encoders that write exactly the bytes we want."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from PIL import Image

from carve3d_reward.errors import InvalidInputError
from carve3d_reward.grid import decode_grid
from carve3d_reward.layouts import INSTANT3D_2X2

MAX_BODY = 2_000_000
MAX_PIXELS = 1024 * 1024
MAX_REQUEST_PIXELS = 4 * MAX_PIXELS
MAX_GRIDS = 256  # the ServiceSettings default
VIEW_SIZE = 64  # the fuzz server's working resolution
BOUNDARY = "fuzzboundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"

ERROR = "error"  # a 4xx with a JSON error body
GRIDS = "grids"  # a 200 whose results match `statuses` ("invalid" or "scored")


@dataclass(frozen=True)
class Case:
    category: str
    name: str
    body: bytes
    content_type: str | None
    expect: str = ERROR
    statuses: tuple[str, ...] = ()  # GRIDS only: per grid, "invalid" or "scored"
    status: int | None = None  # ERROR only: the exact status, where it matters
    method: str = "POST"
    path: str = "/mrc"
    chunked: bool = False  # send without Content-Length (Transfer-Encoding: chunked)
    accept: str | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


class Corpus:
    """Cases in the order they were added; names must be unique."""

    def __init__(self) -> None:
        self.cases: list[Case] = []

    def add(self, category: str, name: str, body: bytes, content_type: str | None, **kw: Any) -> None:
        self.cases.append(Case(category, name, body, content_type, **kw))


def encode(arr: np.ndarray | Image.Image, fmt: str, **kw: Any) -> bytes:
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int, height: int, raw: bytes, *, bit_depth: int = 8, colour: int = 2, extra: bytes = b"") -> bytes:
    """A PNG with a valid CRC everywhere, whatever the IHDR declares."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + extra
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def png_rows(pixels: np.ndarray) -> bytes:
    """Filter-type-0 scanlines of ``[H, W, C]`` pixels (uint8, or uint16 written big-endian)."""
    if pixels.dtype == np.uint8:
        rows = pixels.reshape(pixels.shape[0], -1)
    else:
        rows = pixels.astype(">u2").reshape(pixels.shape[0], -1).view(np.uint8)
    return b"".join(b"\x00" + row.tobytes() for row in rows)


def png16(grid: np.ndarray, *, colour: int = 2) -> bytes:
    """A 16-bit PNG of ``uint8`` pixels scaled to the full 16-bit range (colour 0 grey, 2 RGB, 4 LA, 6 RGBA)."""
    pixels = grid.astype(np.uint16) * 257
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return png(grid.shape[1], grid.shape[0], png_rows(pixels), bit_depth=16, colour=colour)


def set_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """Patch the SOF0/SOF2 frame header of a JPEG to declare another size."""
    out = bytearray(data)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        i = out.find(marker)
        if i >= 0:
            struct.pack_into(">HH", out, i + 5, height, width)
            return bytes(out)
    raise AssertionError("no SOF marker")


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'Content-Disposition: form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\n{disposition}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
        out += data + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return out


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def locally_invalid(data: bytes) -> bool:
    """Whether these image bytes are not a usable grid (the server must then say so, never 5xx)."""
    try:
        decode_grid(data, INSTANT3D_2X2, view_size=VIEW_SIZE, max_pixels=MAX_PIXELS)
    except InvalidInputError:
        return True
    except Exception:  # noqa: BLE001 - a decoder crash is a bad input too: the server must still answer 4xx
        return True
    return False
