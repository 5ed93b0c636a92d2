"""Image bodies: broken encodings, bombs, sizes that do not split, every pixel mode, refused formats."""

from __future__ import annotations

import random
import struct
import zlib

import numpy as np
from PIL import Image

from .encoders import (
    Corpus,
    encode,
    locally_invalid,
    png,
    png16,
    png_chunk,
    png_rows,
    set_jpeg_size,
)

SCORED = "scored"  # a single-image body that must be scored (200, status ok or empty_view)

# sizes (w, h) that do not split into 2x2 square tiles of >= 16 px
BAD_SIZES = [(1, 1), (2, 2), (129, 128), (128, 129), (127, 127), (256, 128), (128, 256), (30, 30), (64, 32), (96, 64)]


def mutants(rng: random.Random, base: bytes, n: int, kind: str, *, max_tries: int = 4000) -> list[bytes]:
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
        if blob not in seen and locally_invalid(blob):
            seen.add(blob)
            out.append(blob)
    assert len(out) == n, f"only {len(out)} {kind} mutants"
    return out


def accepted_modes(grid: np.ndarray) -> dict[str, tuple[str, bytes]]:
    """The grid in every pixel mode PNG, JPEG and WebP can carry: each must be scored."""
    img = Image.fromarray(grid)
    gray = np.asarray(img.convert("L"))
    alpha = np.where(gray < 250, 255, 0).astype(np.uint8)  # the object opaque, the background transparent
    rgba = np.dstack([grid, alpha])
    la = np.dstack([gray, alpha])
    palette = img.convert("P")
    palette_t = palette.copy()
    palette_t.info["transparency"] = int(np.asarray(palette)[0, 0])
    out = {
        "png_1": ("image/png", encode(img.convert("1"), "PNG")),
        "png_L": ("image/png", encode(gray, "PNG")),
        "png_LA": ("image/png", encode(Image.fromarray(la, "LA"), "PNG")),
        "png_P": ("image/png", encode(palette, "PNG")),
        "png_P_transparency": ("image/png", encode(palette_t, "PNG", transparency=palette_t.info["transparency"])),
        "png_P_4bit": ("image/png", encode(img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG", bits=4)),
        "png_RGB": ("image/png", encode(grid, "PNG")),
        "png_RGBA": ("image/png", encode(rgba, "PNG")),
        "png_I16": ("image/png", png16(gray, colour=0)),
        "png_LA16": ("image/png", png16(la, colour=4)),
        "png_RGB16": ("image/png", png16(grid, colour=2)),
        "png_RGBA16": ("image/png", png16(rgba, colour=6)),
        "jpeg_L": ("image/jpeg", encode(gray, "JPEG", quality=95)),
        "jpeg_RGB": ("image/jpeg", encode(grid, "JPEG", quality=95)),
        "jpeg_CMYK": ("image/jpeg", encode(img.convert("CMYK"), "JPEG", quality=95)),
        "jpeg_progressive": ("image/jpeg", encode(grid, "JPEG", quality=80, progressive=True)),
        "webp_RGB_lossless": ("image/webp", encode(grid, "WEBP", lossless=True)),
        "webp_RGB_lossy": ("image/webp", encode(grid, "WEBP", quality=90)),
        "webp_RGBA": ("image/webp", encode(rgba, "WEBP", lossless=True)),
    }
    for bits in (1, 2, 4):  # low-bit-depth greyscale, written by hand
        levels = (1 << bits) - 1
        q = (gray.astype(np.int32) * levels // 255).astype(np.uint8)
        rows = b"".join(
            b"\x00" + np.packbits(np.unpackbits(r[:, None], axis=1)[:, 8 - bits :].ravel()).tobytes() for r in q
        )
        out[f"png_grey_{bits}bit"] = ("image/png", png(grid.shape[1], grid.shape[0], rows, bit_depth=bits, colour=0))
    return out


def premultiplied_tiff(la: Image.Image) -> bytes:
    """A greyscale TIFF whose alpha is marked associated (ExtraSamples = 1): Pillow opens it as mode La."""
    data = encode(la, "TIFF")
    tag = b"\x52\x01\x03\x00\x01\x00\x00\x00\x02\x00"  # ExtraSamples, SHORT, count 1, value 2 (unassociated)
    i = data.find(tag)
    assert i > 0, "no ExtraSamples tag"
    return data[: i + 8] + b"\x01" + data[i + 9 :]


def refused_formats(grid: np.ndarray) -> dict[str, bytes]:
    """The grid in formats the service refuses (415), in the modes that broke it before (La, RGBa, F with NaN)."""
    img = Image.fromarray(grid)
    gray = np.asarray(img.convert("L"))
    la = Image.fromarray(np.dstack([gray, np.full_like(gray, 200)]), "LA")
    nan = gray.astype(np.float32) / 255.0
    nan[:8, :8] = np.nan
    out = {
        "tiff_La": premultiplied_tiff(la),
        "tiff_F_nan": encode(Image.fromarray(nan, "F"), "TIFF"),
        "tiff_F": encode(Image.fromarray(gray.astype(np.float32) / 255.0, "F"), "TIFF"),
        "tiff_I16": encode(Image.fromarray(gray.astype(np.uint16) * 257), "TIFF"),
        "tiff_I": encode(Image.fromarray(gray.astype(np.int32) * 1000), "TIFF"),
        "tiff_CMYK": encode(img.convert("CMYK"), "TIFF"),
        "tiff_YCbCr_jpeg": encode(img, "TIFF", compression="jpeg"),
        "tiff_1": encode(img.convert("1"), "TIFF"),
        "tiff_RGB_lzw": encode(img, "TIFF", compression="tiff_lzw"),
        "bmp_RGB": encode(img, "BMP"),
        "bmp_P": encode(img.convert("P"), "BMP"),
        "bmp_1": encode(img.convert("1"), "BMP"),
        "gif": encode(img, "GIF"),
        "ico": encode(img.resize((64, 64)), "ICO"),
        "tga_signature_free": encode(img, "TGA"),  # no signature: 'not a decodable image' (400), still 4xx
    }
    return out


def add_image_cases(corpus: Corpus, rng: random.Random, nrng: np.random.Generator, grids: np.ndarray) -> None:
    add = corpus.add
    grid = grids[0]
    png_a, jpeg_a = encode(grid, "PNG"), encode(grid, "JPEG", quality=92)
    png_b, jpeg_b = encode(grids[1], "PNG"), encode(grids[1], "JPEG", quality=75, progressive=True)

    # truncated and bit-flipped encodings of real grids
    for i, blob in enumerate(mutants(rng, png_a, 40, "truncated") + mutants(rng, png_b, 20, "truncated")):
        add("png_truncated", f"png_truncated_{i}", blob, "image/png")
    for i, blob in enumerate(mutants(rng, png_a, 40, "flipped") + mutants(rng, png_b, 20, "flipped")):
        add("png_bitflip", f"png_bitflip_{i}", blob, "image/png")
    for i, blob in enumerate(mutants(rng, jpeg_a, 30, "truncated") + mutants(rng, jpeg_b, 15, "truncated")):
        add("jpeg_truncated", f"jpeg_truncated_{i}", blob, "image/jpeg")
    for i, blob in enumerate(mutants(rng, jpeg_a, 30, "flipped") + mutants(rng, jpeg_b, 15, "flipped")):
        add("jpeg_bitflip", f"jpeg_bitflip_{i}", blob, "image/jpeg")
    for fmt, kw in (("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {"compression": "tiff_lzw"}), ("GIF", {})):
        base = encode(grid, fmt, **kw)
        for kind in ("truncated", "flipped"):
            for i, blob in enumerate(mutants(rng, base, 6, kind)):
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
        bomb = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", tiny) + png_chunk(b"IEND", b"")
        add("bomb", f"png_ihdr_{w}x{h}", bomb, "image/png", status=413)
    # a real, fully valid 2048x2048 image packed into ~12 kB of zlib: over max_pixels
    add("bomb", "png_idat_2048x2048_zeros", png(2048, 2048, b"\x00" * (2048 * (2048 * 3 + 1))), "image/png", status=413)
    for w, h in ((65_535, 65_535), (60_000, 20), (1100, 1000)):
        add("bomb", f"jpeg_sof_{w}x{h}", set_jpeg_size(jpeg_a, w, h), "image/jpeg", status=413)
    webp = bytearray(encode(grid, "WEBP", lossless=True))  # VP8L: 14-bit width-1 and height-1 after the signature
    bits = (16383) | (16383 << 14)
    struct.pack_into("<I", webp, 21, bits | (struct.unpack_from("<I", webp, 21)[0] & ~((1 << 28) - 1)))
    add("bomb", "webp_vp8l_16384x16384", bytes(webp), "image/webp", status=413)
    gif = bytearray(encode(grid, "GIF"))
    struct.pack_into("<HH", gif, 6, 65_535, 65_535)
    add("bomb", "gif_screen_65535x65535", bytes(gif), "image/png", status=415)  # GIF is never decoded
    bmp = bytearray(encode(grid, "BMP"))
    struct.pack_into("<ii", bmp, 18, 100_000, 100_000)
    add("bomb", "bmp_100000x100000", bytes(bmp), "image/png", status=415)
    raw = png_rows(grid)
    zeros = zlib.compress(b"\x00" * (64 << 20), 9)  # 64 MiB of text in ~65 kB
    add("bomb", "png_ztxt_bomb", png(128, 128, raw, extra=png_chunk(b"zTXt", b"k\x00\x00" + zeros)), "image/png")
    add("bomb", "png_iccp_bomb", png(128, 128, raw, extra=png_chunk(b"iCCP", b"p\x00\x00" + zeros)), "image/png")
    add(
        "bomb",
        "png_itxt_bomb",
        png(128, 128, raw, extra=png_chunk(b"iTXt", b"k\x00\x01\x00\x00\x00" + zeros)),
        "image/png",
    )
    many = zlib.compress(b"a" * 900_000, 9)  # ~1 kB each, 100 of them: 90 MB of text in total
    add("bomb", "png_many_ztxt", png(128, 128, raw, extra=png_chunk(b"zTXt", b"k\x00\x00" + many) * 100), "image/png")

    # sizes that do not split into square tiles, RGB
    for w, h in BAD_SIZES:
        arr = nrng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        add("odd_size", f"png_{w}x{h}", encode(arr, "PNG"), "image/png", status=400)
        add("odd_size", f"jpeg_{w}x{h}", encode(arr, "JPEG"), "image/jpeg", status=400)

    # every accepted mode at sizes that do not split: the size is refused, whatever the mode
    for w, h in ((129, 128), (128, 256), (1, 1)):
        small = np.asarray(Image.fromarray(grid).resize((w, h)))
        for mode, (ctype, blob) in accepted_modes(small).items():
            add("odd_mode_size", f"{mode}_{w}x{h}", blob, ctype, status=400)

    # every accepted mode at a size that splits: scored (the La-as-PNG 500 was one of these paths)
    for mode, (ctype, blob) in accepted_modes(grids[2]).items():
        add("mode", f"mode_{mode}", blob, ctype, expect=SCORED)

    # formats the service refuses, under every image content type: 415 naming the format
    for name, blob in refused_formats(grids[3]).items():
        for ctype in ("image/png", "image/jpeg", "image/webp"):
            add("refused_format", f"{name}_as_{ctype.split('/')[1]}", blob, ctype, status=400 if "tga" in name else 415)
    # an accepted format under another accepted format's content type: 415 naming both
    for name, blob, ctype in (
        ("png_as_jpeg", png_a, "image/jpeg"),
        ("jpeg_as_png", jpeg_a, "image/png"),
        ("webp_as_png", encode(grid, "WEBP", lossless=True), "image/png"),
        ("png_as_webp", png_a, "image/webp"),
    ):
        add("format_mismatch", name, blob, ctype, status=415)
    # animations are not grids
    frames = [Image.fromarray(g) for g in grids[:2]]
    apng = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    awebp = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    add("animated", "apng_2_frames", apng, "image/png", status=400)
    add("animated", "webp_2_frames", awebp, "image/webp", status=400)

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
