"""Fuzz ``POST /mrc`` with a deterministic corpus of malformed bodies.

One server for the module (uvicorn in a thread, the small fast metric). The
corpus (> 500 bodies, seeded) covers broken images (truncated, bit-flipped,
decompression bombs, odd sizes, odd modes), broken msgpack / JSON / multipart,
wrong content types and oversized bodies; it is sent by 8 threads at once.
Every answer must be a 4xx with a JSON ``{error, detail, request_id}`` body -
except multi-grid requests whose structure is valid but whose grids are not:
those are a 200 in which each bad grid is ``status: "invalid"`` with an error.
Afterwards the server must still score a good grid and be ready.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import io
import json
import random
import re
import resource
import struct
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from PIL import Image

from carve3d_reward.errors import InvalidInputError
from carve3d_reward.grid import check_grid_size, decode_image
from carve3d_reward.layouts import INSTANT3D_2X2
from carve3d_reward.model import MRCModel
from carve3d_reward.service.app import create_app, to_jsonable
from carve3d_reward.service.settings import ServiceSettings
from carve3d_reward.settings import MetricSettings
from carve3d_reward.synthetic import make_grids

from .serving import serve_app

pytestmark = pytest.mark.timeout(300)

MAX_BODY = 2_000_000
MAX_PIXELS = 1024 * 1024
MAX_GRIDS = 256  # the ServiceSettings default
SEED = 20240611
WORKERS = 8

# sizes (w, h) that do not split into 2x2 square tiles of >= 16 px
BAD_SIZES = [(1, 1), (2, 2), (129, 128), (128, 129), (127, 127), (256, 128), (128, 256), (30, 30), (64, 32), (96, 64)]

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
    method: str = "POST"
    path: str = "/mrc"
    chunked: bool = False  # send without Content-Length (Transfer-Encoding: chunked)
    accept: str | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


# -- encoders --------------------------------------------------------------------------------------
def _encode(arr: np.ndarray | Image.Image, fmt: str, **kw: Any) -> bytes:
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, raw: bytes, *, bit_depth: int = 8, colour: int = 2, extra: bytes = b"") -> bytes:
    """A PNG with a valid CRC everywhere, whatever the IHDR declares."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + extra
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def _png_rows(pixels: np.ndarray) -> bytes:
    """Filter-type-0 scanlines of ``[H, W, C]`` big-endian pixels."""
    rows = pixels.reshape(pixels.shape[0], -1).view(np.uint8) if pixels.dtype == np.uint8 else None
    if rows is None:
        rows = pixels.astype(">u2").reshape(pixels.shape[0], -1).view(np.uint8)
    return b"".join(b"\x00" + row.tobytes() for row in rows)


def _rgb16_png(grid: np.ndarray) -> bytes:
    return _png(grid.shape[1], grid.shape[0], _png_rows(grid.astype(np.uint16) * 257), bit_depth=16, colour=2)


def _set_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """Patch the SOF0/SOF2 frame header of a JPEG to declare another size."""
    out = bytearray(data)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        i = out.find(marker)
        if i >= 0:
            struct.pack_into(">HH", out, i + 5, height, width)
            return bytes(out)
    raise AssertionError("no SOF marker")


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "fuzzboundary", close: bool = True) -> bytes:
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


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _locally_invalid(data: bytes) -> bool:
    """Whether these image bytes are not a usable grid (the server must then say so, never 5xx)."""
    try:
        arr = decode_image(data, max_pixels=MAX_PIXELS)
        check_grid_size(arr.shape[0], arr.shape[1], INSTANT3D_2X2)
    except InvalidInputError:
        return True
    except Exception:  # noqa: BLE001 - a decoder crash is a bad input too: the server must still answer 4xx
        return True
    return False


def _mutants(rng: random.Random, base: bytes, n: int, kind: str, *, max_tries: int = 4000) -> list[bytes]:
    """``n`` distinct truncated or bit-flipped copies of ``base`` that do not decode to a usable grid."""
    out: list[bytes] = []
    seen: set[bytes] = set()
    for _ in range(max_tries):
        if len(out) >= n:
            break
        data = bytearray(base)
        if kind == "truncated":
            data = data[: rng.randrange(0, len(base) - 1)]
        else:
            for _ in range(rng.randint(1, 12)):
                pos = rng.randrange(len(data)) if rng.random() < 0.5 else rng.randrange(min(len(data), 700))
                data[pos] ^= 1 << rng.randrange(8)
        blob = bytes(data)
        if blob not in seen and _locally_invalid(blob):
            seen.add(blob)
            out.append(blob)
    assert len(out) == n, f"only {len(out)} {kind} mutants"
    return out


# -- the corpus ------------------------------------------------------------------------------------
def build_corpus(grids: np.ndarray, seed: int = SEED) -> list[Case]:
    """Every malformed request, deterministically from ``seed`` and the good ``grids`` [N, 128, 128, 3]."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    cases: list[Case] = []

    def add(category: str, name: str, body: bytes, ctype: str | None, **kw: Any) -> None:
        cases.append(Case(category, name, body, ctype, **kw))

    grid = grids[0]
    png, jpeg = _encode(grid, "PNG"), _encode(grid, "JPEG", quality=92)
    png2, jpeg2 = _encode(grids[1], "PNG"), _encode(grids[1], "JPEG", quality=75, progressive=True)

    # truncated and bit-flipped encodings of real grids
    for i, blob in enumerate(_mutants(rng, png, 40, "truncated") + _mutants(rng, png2, 20, "truncated")):
        add("png_truncated", f"png_truncated_{i}", blob, "image/png")
    for i, blob in enumerate(_mutants(rng, png, 40, "flipped") + _mutants(rng, png2, 20, "flipped")):
        add("png_bitflip", f"png_bitflip_{i}", blob, "image/png")
    for i, blob in enumerate(_mutants(rng, jpeg, 30, "truncated") + _mutants(rng, jpeg2, 15, "truncated")):
        add("jpeg_truncated", f"jpeg_truncated_{i}", blob, "image/jpeg")
    for i, blob in enumerate(_mutants(rng, jpeg, 30, "flipped") + _mutants(rng, jpeg2, 15, "flipped")):
        add("jpeg_bitflip", f"jpeg_bitflip_{i}", blob, "image/jpeg")
    for fmt, kw in (("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {"compression": "tiff_lzw"}), ("GIF", {})):
        base = _encode(grid, fmt, **kw)
        for kind in ("truncated", "flipped"):
            for i, blob in enumerate(_mutants(rng, base, 6, kind)):
                add("other_format_mutant", f"{fmt.lower()}_{kind}_{i}", blob, "image/webp")

    # decompression bombs: headers declaring huge sizes (valid CRCs), compressed-chunk bombs
    tiny = zlib.compress(b"\x00" * 64)
    for w, h in (
        (100_000, 100_000),
        (65_535, 65_535),
        (2_147_483_647, 1),
        (1, 2_000_000),
        (2_000, 2_000),
        (1025, 1024),
    ):
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", tiny) + _png_chunk(b"IEND", b"")
        add("bomb", f"png_ihdr_{w}x{h}", bomb, "image/png")
    # a real, fully valid 2048x2048 image packed into ~12 kB of zlib: over max_pixels
    add("bomb", "png_idat_2048x2048_zeros", _png(2048, 2048, b"\x00" * (2048 * (2048 * 3 + 1))), "image/png")
    for w, h in ((65_535, 65_535), (60_000, 20), (1100, 1000)):
        add("bomb", f"jpeg_sof_{w}x{h}", _set_jpeg_size(jpeg, w, h), "image/jpeg")
    gif = bytearray(_encode(grid, "GIF"))
    struct.pack_into("<HH", gif, 6, 65_535, 65_535)
    add("bomb", "gif_screen_65535x65535", bytes(gif), "image/png")
    bmp = bytearray(_encode(grid, "BMP"))
    struct.pack_into("<ii", bmp, 18, 100_000, 100_000)
    add("bomb", "bmp_100000x100000", bytes(bmp), "image/png")
    raw = _png_rows(grid)
    zeros = zlib.compress(b"\x00" * (64 << 20), 9)  # 64 MiB of text in ~65 kB
    add("bomb", "png_ztxt_bomb", _png(128, 128, raw, extra=_png_chunk(b"zTXt", b"k\x00\x00" + zeros)), "image/png")
    add("bomb", "png_iccp_bomb", _png(128, 128, raw, extra=_png_chunk(b"iCCP", b"p\x00\x00" + zeros)), "image/png")
    add(
        "bomb",
        "png_itxt_bomb",
        _png(128, 128, raw, extra=_png_chunk(b"iTXt", b"k\x00\x01\x00\x00\x00" + zeros)),
        "image/png",
    )
    many = zlib.compress(b"a" * 900_000, 9)  # ~1 kB each, 100 of them: 90 MB of text in total
    add("bomb", "png_many_ztxt", _png(128, 128, raw, extra=_png_chunk(b"zTXt", b"k\x00\x00" + many) * 100), "image/png")

    # sizes that do not split into square tiles, RGB
    for w, h in BAD_SIZES:
        arr = nrng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        add("odd_size", f"png_{w}x{h}", _encode(arr, "PNG"), "image/png")
        add("odd_size", f"jpeg_{w}x{h}", _encode(arr, "JPEG"), "image/jpeg")

    # other modes at sizes that do not split (documented conversions, but the size is wrong)
    for w, h in ((129, 128), (128, 256), (1, 1)):
        base = np.asarray(Image.fromarray(grid).resize((w, h)))
        gray = np.asarray(Image.fromarray(base).convert("L"))
        modes = {
            "L": _encode(gray, "PNG"),
            "LA": _encode(Image.fromarray(base).convert("LA"), "PNG"),
            "RGBA": _encode(Image.fromarray(base).convert("RGBA"), "PNG"),
            "I16": _encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
            "RGB16": _rgb16_png(base),
            "P": _encode(Image.fromarray(base).convert("P"), "PNG"),
            "1": _encode(Image.fromarray(gray).convert("1"), "PNG"),
            "CMYK": _encode(Image.fromarray(base).convert("CMYK"), "JPEG"),
            "I": _encode(Image.fromarray(gray.astype(np.int32) * 1000), "TIFF"),
            "F": _encode(Image.fromarray(gray.astype(np.float32) / 255.0), "TIFF"),
        }
        for mode, blob in modes.items():
            add("odd_mode_size", f"{mode}_{w}x{h}", blob, "image/png")

    # random bytes under every content type, and a valid-looking signature followed by junk
    ctypes = ["image/png", "image/jpeg", "image/webp", "application/msgpack", "application/json", None]
    for i in range(36):
        blob = nrng.integers(0, 256, rng.choice([1, 7, 64, 1000, 20_000]), dtype=np.uint8).tobytes()
        add("random_bytes", f"random_{i}", blob, ctypes[i % len(ctypes)])
    for i, sig in enumerate(
        [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"GIF89a", b"BM"]
    ):
        add(
            "random_bytes",
            f"signature_junk_{i}",
            sig + nrng.integers(0, 256, 500, dtype=np.uint8).tobytes(),
            "image/png",
        )

    # empty bodies
    for ctype in [*ctypes, "multipart/form-data; boundary=fuzzboundary", "text/plain"]:
        add("empty_body", f"empty_{ctype}", b"", ctype)

    # bad msgpack: undecodable
    valid_req = _pack({"grids": [{"image": png}], "return_renders": False})
    for i in range(20):
        add(
            "msgpack_undecodable",
            f"msgpack_trunc_{i}",
            valid_req[: rng.randrange(1, len(valid_req) - 1)],
            "application/msgpack",
        )
    undecodable = {
        "reserved_c1": b"\xc1",
        "map_missing_values": b"\x82\xa5grids",
        "bin_len_past_end": b"\x81\xa5grids\x91\x81\xa5image\xc6\xff\xff\xff\xff",
        "str_bad_utf8": b"\x81\xa5grids\x91\x81\xa5dtype\xa2\xff\xfe",
        "int_map_key": b"\x81\x01\x90",
        "nested_100k": b"\x91" * 100_000,
        "ext_type": b"\x81\xa5grids\x91\xd6\x05abcd",
        "timestamp_ext": b"\x81\xa5grids\x91\xd6\xff\x00\x00\x00\x01",
        "trailing_bytes": valid_req + b"\x00",
        "array_len_huge": b"\xdd\xff\xff\xff\xff",
        "map_len_huge": b"\xdf\xff\xff\xff\xff",
        "grids_257": _pack({"grids": [{"image": b"x"}] * (MAX_GRIDS + 1)}),
    }
    for name, blob in undecodable.items():
        add("msgpack_undecodable", name, blob, "application/msgpack")

    # bad msgpack / JSON: decodable, wrong structure (same messages in both encodings)
    raw_ok = grid.tobytes()
    structures: dict[str, Any] = {
        "list_at_top": [{"image": png}],
        "int_at_top": 5,
        "nil_at_top": None,
        "str_at_top": "grids",
        "no_grids": {"return_renders": False},
        "grids_not_list": {"grids": {"image": png}},
        "grids_str": {"grids": "png"},
        "grids_empty": {"grids": []},
        "entry_int": {"grids": [1]},
        "entry_list": {"grids": [[png]]},
        "entry_nil": {"grids": [None]},
        "entry_empty_map": {"grids": [{}]},
        "entry_empty_image": {"grids": [{"image": b""}]},
        "image_int": {"grids": [{"image": 12}]},
        "image_list": {"grids": [{"image": [1, 2]}]},
        "data_int": {"grids": [{"data": 3, "shape": [128, 128, 3]}]},
        "data_list": {"grids": [{"data": [0, 1, 2], "shape": [1, 1, 3]}]},
        "shape_missing": {"grids": [{"data": raw_ok}]},
        "shape_len2": {"grids": [{"data": raw_ok, "shape": [128, 384]}]},
        "shape_len4": {"grids": [{"data": raw_ok, "shape": [1, 128, 128, 3]}]},
        "shape_negative": {"grids": [{"data": raw_ok, "shape": [-128, -128, 3]}]},
        "shape_zero": {"grids": [{"data": b"", "shape": [0, 0, 3]}]},
        "shape_strings": {"grids": [{"data": raw_ok, "shape": ["128", "128", "3"]}]},
        "shape_floats": {"grids": [{"data": raw_ok, "shape": [128.0, 128.0, 3.0]}]},
        "shape_scalar": {"grids": [{"data": raw_ok, "shape": 49152}]},
        "shape_4_channels": {"grids": [{"data": raw_ok, "shape": [96, 128, 4]}]},
        "shape_huge": {"grids": [{"data": raw_ok, "shape": [1 << 40, 1 << 40, 3]}]},
        "shape_over_max_pixels": {"grids": [{"data": raw_ok, "shape": [2048, 2048, 3]}]},
        "dtype_float32": {"grids": [{"data": raw_ok, "shape": [64, 64, 3], "dtype": "float32"}]},
        "dtype_int": {"grids": [{"data": raw_ok, "shape": [128, 128, 3], "dtype": 8}]},
        "data_short": {"grids": [{"data": raw_ok[:-1], "shape": [128, 128, 3]}]},
        "data_long": {"grids": [{"data": raw_ok + b"\x00", "shape": [128, 128, 3]}]},
        "data_float_bytes": {"grids": [{"data": raw_ok * 4, "shape": [128, 128, 3]}]},
        "return_renders_str": {"grids": [{"image": png}], "return_renders": "yes"},
        "return_renders_int": {"grids": [{"image": png}], "return_renders": 1},
        "second_entry_bad": {"grids": [{"image": png}, {"data": raw_ok, "shape": [128, 128]}]},
    }
    for name, obj in structures.items():
        add("msgpack_structure", f"msgpack_{name}", _pack(obj), "application/msgpack")
        add("json_structure", f"json_{name}", json.dumps(to_jsonable(obj)).encode(), "application/json")
    add(
        "json_structure",
        "json_grids_257",
        json.dumps({"grids": [{"image": "eA=="}] * (MAX_GRIDS + 1)}).encode(),
        "application/json",
    )

    # bad JSON text and bad base64
    valid_json = json.dumps(to_jsonable({"grids": [{"image": png}]})).encode()
    bad_json = {
        "truncated_1": valid_json[:1],
        "truncated_half": valid_json[: len(valid_json) // 2],
        "trailing_comma": b'{"grids": [],}',
        "single_quotes": b"{'grids': []}",
        "nan_bare": b'{"grids": NaN',
        "latin1": '{"grids": ["é"]}'.encode("latin-1"),
        "utf16": '{"grids": []}'.encode("utf-16"),
        "bom_garbage": b"\xef\xbb\xbf\xff\xfe",
        "deep_array": b"[" * 100_000,
        "deep_object": b'{"a":' * 20_000,
        "deep_in_grids": b'{"grids":' + b"[" * 5_000,
        "huge_int": b'{"grids": [{"data": "AAAA", "shape": [' + b"9" * 5000 + b", 1, 3]}]}",
        "only_whitespace": b"   \n\t ",
        "two_documents": valid_json + valid_json,
    }
    for name, blob in bad_json.items():
        add("json_invalid", f"json_{name}", blob, "application/json")
    bad_b64 = {
        "not_base64": "!!!not base64!!!",
        "missing_padding": "QUI",
        "padding_inside": "QU=J",
        "one_char_over": "QUJDR",
        "non_ascii": "Ã©Ã©Ã©Ã©",
        "url_safe_alphabet": base64.urlsafe_b64encode(b"\xfb\xff" * 30).decode(),
        "embedded_newline": base64.b64encode(png[:60]).decode()[:40] + "\n" + base64.b64encode(png[:60]).decode()[40:],
        "truncated": base64.b64encode(png).decode()[:-3],
    }
    for name, text in bad_b64.items():
        add(
            "json_bad_base64",
            f"b64_image_{name}",
            json.dumps({"grids": [{"image": text}]}).encode(),
            "application/json",
        )
        body = json.dumps({"grids": [{"data": text, "shape": [128, 128, 3]}]}).encode()
        add("json_bad_base64", f"b64_data_{name}", body, "application/json")

    # wrong content types (with a valid PNG body)
    for ctype in [
        "text/plain",
        "application/octet-stream",
        None,
        "image/gif",
        "image/bmp",
        "application/xml",
        "application/x-www-form-urlencoded",
        "multipart/mixed; boundary=fuzzboundary",
        "application/protobuf",
        "image",
        "*/*",
        ";;;",
    ]:
        add("content_type", f"ctype_{ctype}", png, ctype)

    # oversized bodies: with Content-Length, and chunked without it
    big = nrng.integers(0, 256, MAX_BODY + 1, dtype=np.uint8).tobytes()
    for ctype in ("image/png", "application/msgpack", "application/json", "multipart/form-data; boundary=fuzzboundary"):
        add("oversized", f"oversized_cl_{ctype}", big, ctype)
        add("oversized", f"oversized_chunked_{ctype}", big + big[:500_000], ctype, chunked=True)
    add("oversized", "oversized_msgpack_one_grid", _pack({"grids": [{"image": big}]}), "application/msgpack")

    # malformed multipart
    good_part = [("grid", "a.png", png)]
    multipart = {
        "boundary_mismatch": ("multipart/form-data; boundary=other", _multipart(good_part)),
        "no_boundary_param": ("multipart/form-data", _multipart(good_part)),
        "empty_boundary": ("multipart/form-data; boundary=", _multipart(good_part)),
        "no_files_fields_only": ("multipart/form-data; boundary=fuzzboundary", _multipart([("grid", None, b"abc")])),
        "no_parts": ("multipart/form-data; boundary=fuzzboundary", b"--fuzzboundary--\r\n"),
        "garbage": ("multipart/form-data; boundary=fuzzboundary", b"garbage" * 50),
        "no_content_disposition": (
            "multipart/form-data; boundary=fuzzboundary",
            b"--fuzzboundary\r\nContent-Type: image/png\r\n\r\nabc\r\n--fuzzboundary--\r\n",
        ),
        "truncated_headers": ("multipart/form-data; boundary=fuzzboundary", _multipart(good_part)[:40]),
        "unclosed_part": ("multipart/form-data; boundary=fuzzboundary", _multipart(good_part, close=False)[:200]),
        "too_many_files": (
            "multipart/form-data; boundary=fuzzboundary",
            _multipart([("grid", f"{i}.png", b"x") for i in range(MAX_GRIDS + 1)]),
        ),
        "header_line_junk": (
            "multipart/form-data; boundary=fuzzboundary",
            b"--fuzzboundary\r\n\x00\x01\x02 no colon here\r\n\r\nabc\r\n--fuzzboundary--\r\n",
        ),
        "random_after_boundary": (
            "multipart/form-data; boundary=fuzzboundary",
            b"--fuzzboundary\r\n" + nrng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        ),
    }
    for name, (ctype, blob) in multipart.items():
        add("multipart_malformed", f"multipart_{name}", blob, ctype)

    # wrong method / path
    add("route", "get_mrc", b"", None, method="GET")
    add("route", "put_mrc", png, "image/png", method="PUT")
    add("route", "delete_mrc", b"", None, method="DELETE")
    add("route", "post_unknown_path", png, "image/png", path="/mrc/extra")
    add("route", "post_v1_mrc", png, "image/png", path="/v1/mrc")

    # odd request ids (the idempotency key) on bad bodies; the same id twice
    for name, rid in (
        ("long", b"r" * 10_000),
        ("latin1", b"\xff\xfe\xe9"),
        ("empty", b""),
        ("inner_whitespace", b"a b\tc"),
        ("repeated_a", b"fuzz-repeated"),
        ("repeated_b", b"fuzz-repeated"),
    ):
        add("request_id_header", f"request_id_{name}", png[:300], "image/png", headers=(("x-request-id", rid),))

    # structurally valid multi-grid requests whose grids are bad: 200, each grid "invalid"
    corrupt = [c.body for c in cases if c.category in ("png_truncated", "jpeg_bitflip", "odd_size", "bomb")]
    corrupt = [b for b in corrupt if 0 < len(b) < 200_000]  # an empty 'image' is a missing field (400)
    for i in range(12):
        picks = rng.sample(corrupt, rng.randint(1, 4))
        entries = [{"image": b} for b in picks]
        add(
            "grids_invalid",
            f"msgpack_images_{i}",
            _pack({"grids": entries}),
            "application/msgpack",
            expect=GRIDS,
            statuses=("invalid",) * len(picks),
        )
    for i in range(6):
        picks = rng.sample(corrupt, rng.randint(1, 4))
        body = _multipart([("grid", f"{j}.png", b) for j, b in enumerate(picks)])
        add(
            "grids_invalid",
            f"multipart_files_{i}",
            body,
            "multipart/form-data; boundary=fuzzboundary",
            expect=GRIDS,
            statuses=("invalid",) * len(picks),
        )
    for i in range(4):
        picks = rng.sample(corrupt, rng.randint(1, 3))
        body = json.dumps(to_jsonable({"grids": [{"image": b} for b in picks]})).encode()
        add(
            "grids_invalid",
            f"json_images_{i}",
            body,
            "application/json",
            expect=GRIDS,
            statuses=("invalid",) * len(picks),
            accept="application/json",
        )
    raw_bad = [
        {"data": bytes(3), "shape": [1, 1, 3]},
        {"data": bytes(129 * 128 * 3), "shape": [129, 128, 3]},
        {"data": bytes(128 * 256 * 3), "shape": [128, 256, 3]},
        {"data": bytes(30 * 30 * 3), "shape": [30, 30, 3]},
        {"image": _encode(grid, "PNG")[:100]},
        {"image": b"\x00"},
    ]
    add(
        "grids_invalid",
        "msgpack_raw_bad_sizes",
        _pack({"grids": raw_bad}),
        "application/msgpack",
        expect=GRIDS,
        statuses=("invalid",) * len(raw_bad),
    )
    add(
        "grids_invalid",
        "msgpack_raw_bad_sizes_json_reply",
        _pack({"grids": raw_bad[:3]}),
        "application/msgpack",
        expect=GRIDS,
        statuses=("invalid",) * 3,
        accept="application/json",
    )
    add(
        "grids_invalid",
        "multipart_empty_file",
        _multipart([("grid", "e.png", b"")]),
        "multipart/form-data; boundary=fuzzboundary",
        expect=GRIDS,
        statuses=("invalid",),
    )
    # mixed: one good grid among bad ones (the only scored grids of the corpus)
    mixed = [
        {"image": corrupt[0]},
        {"data": grids[2].tobytes(), "shape": [128, 128, 3]},
        {"data": bytes(3), "shape": [1, 1, 3]},
    ]
    add(
        "grids_invalid",
        "msgpack_mixed_good_and_bad",
        _pack({"grids": mixed}),
        "application/msgpack",
        expect=GRIDS,
        statuses=("invalid", "scored", "invalid"),
    )
    body = _multipart([("grid", "bad.png", corrupt[1]), ("grid", "good.png", _encode(grids[3], "PNG"))])
    add(
        "grids_invalid",
        "multipart_mixed_good_and_bad",
        body,
        "multipart/form-data; boundary=fuzzboundary",
        expect=GRIDS,
        statuses=("invalid", "scored"),
    )

    order = list(range(len(cases)))
    rng.shuffle(order)  # interleave the categories so that slow and fast requests overlap
    return [cases[i] for i in order]


# -- sending and checking --------------------------------------------------------------------------
def _chunks(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


def send(client: httpx.Client, base: str, case: Case) -> httpx.Response:
    headers: dict[str, str | bytes] = {}
    if case.content_type is not None:
        headers["content-type"] = case.content_type
    if case.accept is not None:
        headers["accept"] = case.accept
    headers.update(case.headers)
    content: bytes | Iterator[bytes] = _chunks(case.body) if case.chunked else case.body
    return client.request(case.method, base + case.path, content=content, headers=headers)


def check(case: Case, response: httpx.Response) -> str | None:
    """``None`` if the answer is right for the case, else what is wrong."""
    status = response.status_code
    if case.expect == ERROR:
        if not 400 <= status < 500:
            return f"status {status}, expected 4xx: {response.content[:300]!r}"
        if not response.headers.get("content-type", "").startswith("application/json"):
            return f"status {status} with content-type {response.headers.get('content-type')!r}"
        try:
            body = response.json()
        except ValueError:
            return f"status {status} with a non-JSON body {response.content[:200]!r}"
        for key in ("error", "detail", "request_id"):
            if not (isinstance(body, dict) and isinstance(body.get(key), str) and body[key]):
                return f"status {status}: {key!r} missing or empty in {body!r}"
        if response.headers.get("x-request-id") != body["request_id"]:
            return f"X-Request-Id {response.headers.get('x-request-id')!r} != body request_id {body['request_id']!r}"
        return None
    if status != 200:
        return f"status {status}, expected 200 with per-grid statuses: {response.content[:300]!r}"
    ctype = response.headers.get("content-type", "")
    try:
        payload = msgpack.unpackb(response.content, raw=False) if "msgpack" in ctype else response.json()
    except ValueError as exc:
        return f"undecodable 200 body ({ctype}): {exc}"
    if case.accept == "application/json" and "json" not in ctype:
        return f"asked for JSON, got {ctype!r}"
    results = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(results, list) or len(results) != len(case.statuses):
        return f"expected {len(case.statuses)} results, got {payload!r:.300}"
    if not payload.get("request_id"):
        return "no request_id in the 200 body"
    for i, (want, res) in enumerate(zip(case.statuses, results, strict=True)):
        if want == "invalid":
            if res.get("status") != "invalid" or not (isinstance(res.get("error"), str) and res["error"]):
                return f"grid {i}: expected status 'invalid' with an error, got {res!r:.300}"
            if res.get("mrc") is not None:
                return f"grid {i}: an invalid grid has mrc {res['mrc']!r}"
        elif res.get("status") not in ("ok", "empty_view") or not isinstance(res.get("mrc"), float):
            return f"grid {i}: expected a score, got {res!r:.300}"
    return None


def run_case(client: httpx.Client, base: str, case: Case) -> tuple[Case, str | None, float]:
    start = time.perf_counter()
    try:
        response = send(client, base, case)
    except httpx.HTTPError as exc:
        return case, f"no answer: {type(exc).__name__}: {exc}", time.perf_counter() - start
    return case, check(case, response), time.perf_counter() - start


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_grids() -> np.ndarray:
    grids = make_grids(6, seed=11, view_size=64)  # [6, 3, 128, 128] float
    return np.clip(np.rint(grids.permute(0, 2, 3, 1).numpy() * 255.0), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def corpus(good_grids) -> list[Case]:
    return build_corpus(good_grids)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    metric = MetricSettings(view_size=64, carve_resolution=32, carve_samples=64)
    settings = ServiceSettings(max_body_bytes=MAX_BODY, max_pixels=MAX_PIXELS, metric=metric)
    with serve_app(create_app(settings, model=MRCModel(metric))) as base:
        yield base


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    limits = httpx.Limits(max_connections=WORKERS * 2, max_keepalive_connections=WORKERS * 2)
    with httpx.Client(timeout=httpx.Timeout(60.0), limits=limits) as c:
        yield c


def _score_good(client: httpx.Client, base: str, grid: np.ndarray) -> dict[str, Any]:
    r = client.post(base + "/mrc", content=_encode(grid, "PNG"), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()


# -- tests -----------------------------------------------------------------------------------------
def test_corpus_is_large_deterministic_and_covers_every_category(good_grids, corpus):
    again = build_corpus(good_grids)
    digest = [hashlib.sha256(c.body).hexdigest() + c.name for c in corpus]
    assert digest == [hashlib.sha256(c.body).hexdigest() + c.name for c in again]
    assert len(corpus) >= 500
    assert len({c.name for c in corpus}) == len(corpus)
    counts = collections.Counter(c.category for c in corpus)
    for category in (
        "png_truncated",
        "png_bitflip",
        "jpeg_truncated",
        "jpeg_bitflip",
        "bomb",
        "odd_size",
        "odd_mode_size",
        "random_bytes",
        "empty_body",
        "msgpack_undecodable",
        "msgpack_structure",
        "json_invalid",
        "json_bad_base64",
        "json_structure",
        "content_type",
        "oversized",
        "multipart_malformed",
        "grids_invalid",
        "request_id_header",
    ):
        assert counts[category] > 0, category
    for case in corpus:  # the premise of the odd sizes: they really do not split
        if case.category in ("odd_size", "odd_mode_size"):
            assert _locally_invalid(case.body), case.name
    print("\nfuzz corpus:", dict(sorted(counts.items())), "total", len(corpus))


def test_malformed_bodies_get_json_4xx_never_5xx(server, client, corpus, good_grids):
    failures: list[str] = []
    slowest: list[tuple[float, str]] = []
    start = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as pool:
        for case, problem, elapsed in pool.map(lambda c: run_case(client, server, c), corpus):
            slowest.append((elapsed, case.name))
            if problem is not None:
                failures.append(f"[{case.category}] {case.name}: {problem}")
    total = time.perf_counter() - start
    slowest.sort(reverse=True)
    print(f"\n{len(corpus)} requests in {total:.1f} s; slowest: {slowest[:3]}")
    assert not failures, f"{len(failures)} wrong answers:\n" + "\n".join(failures[:40])
    # the server survived: it still scores a good grid and is ready
    assert _score_good(client, server, good_grids[4])["status"] in ("ok", "empty_view")
    assert client.get(server + "/readyz").status_code == 200
    assert client.get(server + "/healthz").status_code == 200
    # and its own counters agree: no 5xx, no batch that raised
    text = client.get(server + "/metrics").text
    five_xx = [line for line in text.splitlines() if re.match(r'mrc_requests_total\{.*code="5\d\d"', line)]
    assert not five_xx, five_xx
    assert re.search(r"^mrc_batch_failures_total 0\.0$", text, re.M), "a batch raised while scoring"


def test_decompression_bombs_are_rejected_fast_without_memory_growth(server, client, corpus):
    bombs = [c for c in corpus if c.category == "bomb"]
    assert len(bombs) >= 10
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; the server runs in this process
    for case in bombs:
        start = time.perf_counter()
        response = send(client, server, case)
        elapsed = time.perf_counter() - start
        assert response.status_code in (400, 413), (case.name, response.status_code, response.text)
        assert check(case, response) is None, case.name
        assert elapsed < 5.0, f"{case.name} took {elapsed:.1f} s"
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 400, f"peak memory grew by {grown_mib:.0f} MiB while rejecting bombs"
    huge = [c for c in bombs if "100000" in c.name or "65535" in c.name or "2147483647" in c.name]
    for case in huge:
        # GIF is not among the decoded formats: refused (400) before its header is even read.
        expected = 400 if case.name.startswith("gif") else 413
        assert send(client, server, case).status_code == expected, case.name


def _convertible(grid: np.ndarray) -> dict[str, tuple[str, bytes]]:
    """Valid-size grids in modes the decoder documents as conversions (positive controls)."""
    img = Image.fromarray(grid)
    gray = np.asarray(img.convert("L"))
    rgba = np.dstack([grid, np.full(grid.shape[:2], 255, np.uint8)])
    return {
        "L": ("image/png", _encode(gray, "PNG")),
        "RGBA": ("image/png", _encode(rgba, "PNG")),
        "I16": ("image/png", _encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG")),
        "RGB16": ("image/png", _rgb16_png(grid)),
        "P": ("image/png", _encode(img.convert("P"), "PNG")),
        "CMYK": ("image/jpeg", _encode(img.convert("CMYK"), "JPEG", quality=95)),
        "WEBP": ("image/webp", _encode(img, "WEBP", lossless=True)),
    }


def test_documented_conversions_are_scored(server, client, good_grids):
    cases = list(_convertible(good_grids[5]).items())

    def post(item: tuple[str, tuple[str, bytes]]) -> tuple[str, httpx.Response]:
        name, (ctype, body) = item
        return name, client.post(server + "/mrc", content=body, headers={"content-type": ctype})

    with ThreadPoolExecutor(WORKERS) as pool:
        answers = list(pool.map(post, cases))
    for name, response in answers:
        assert response.status_code == 200, (name, response.text)
        assert response.json()["status"] in ("ok", "empty_view"), (name, response.json())
    rgb = _score_good(client, server, good_grids[5])["mrc"]
    rgba = dict(answers)["RGBA"].json()["mrc"]
    assert rgba == pytest.approx(rgb, abs=1e-6)  # opaque alpha changes nothing


def test_server_still_healthy(server, client, good_grids):
    assert client.get(server + "/readyz").status_code == 200
    assert _score_good(client, server, good_grids[0])["status"] in ("ok", "empty_view")
