"""Grids: decode image bytes or arrays and split them into views.

Accepted inputs and the conversions applied (documented, never silent failures):

* PNG, JPEG and WebP bytes or files (the only decoders ever run on them; a
  TIFF, BMP, GIF... is refused naming its format); numpy/torch ``uint8``
  arrays ``[H, W, 3]`` or ``[B, H, W, 3]``; float arrays in ``[0, 1]``.
* Every Pillow pixel mode is converted to RGB: grayscale is replicated,
  palettes expanded, CMYK/YCbCr/LAB/HSV converted; alpha (straight or
  premultiplied) is composited over **white** (the metric's background);
  16-bit and 32-bit images are scaled to ``[0, 1]`` from their full range;
  NaN or infinite values are refused.
* Anything else (undecodable bytes, animations, more pixels than
  ``max_pixels``, sizes that do not divide into the layout, views smaller
  than 16 px) raises an :class:`~carve3d_reward.errors.InvalidInputError`
  subclass naming the problem.

:func:`decode_grid` is the one path from bytes to the metric's input, used
by the service and ``mrc score`` alike: the header is checked before any
pixel is decoded, then each view is converted and resampled to the working
resolution on its own, so a grid is never held at full resolution in float
and a well-compressed huge image costs a bounded amount of memory.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .errors import InvalidInputError, TooManyPixelsError, UnsupportedFormatError
from .layouts import GridLayout
from .pixels import to_uint8

__all__ = [
    "ACCEPTED_FORMATS",
    "IMAGE_SUFFIXES",
    "MIN_VIEW_SIZE",
    "TooManyPixelsError",
    "check_grid_size",
    "decode_grid",
    "decode_image",
    "grid_from_array",
    "grid_from_image",
    "image_to_array",
    "join_grid",
    "load_grid",
    "load_image",
    "open_image",
    "resize_views",
    "split_grid",
    "to_grid_tensor",
    "to_uint8_image",
    "working_view_size",
]

MIN_VIEW_SIZE = 16
DEFAULT_MAX_PIXELS = 4096 * 4096
#: The only decoders ever run on untrusted bytes, with their media types.
ACCEPTED_FORMATS: dict[str, str] = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
#: Signatures of formats that are recognised only to name them in the refusal (never decoded).
_REFUSED_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"BM", "BMP"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"8BPS", "PSD"),
    (0, b"qoif", "QOI"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (4, b"jP  ", "JPEG 2000"),
    (4, b"ftypavif", "AVIF"),
    (4, b"ftypheic", "HEIC"),
    (0, b"\x76\x2f\x31\x01", "OpenEXR"),
)
_PREMULTIPLIED = frozenset({"La", "RGBa"})
T = TypeVar("T")


def _refused_format(data: bytes) -> str | None:
    for offset, signature, name in _REFUSED_SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            return name
    return None


def _corrupt(exc: BaseException) -> InvalidInputError:
    """A decoder's failure on bad bytes, as a sentence (Pillow's own message when it has one)."""
    reason = str(exc) if isinstance(exc, OSError | ValueError | SyntaxError | EOFError) and str(exc) else ""
    return InvalidInputError(f"corrupt or truncated image{': ' + reason if reason else ''}")


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image's header, not its pixels: format, size and frame count are checked here.

    A decompression bomb or an oversized image costs nothing: its declared
    size is refused before a single pixel is decoded.
    """
    if not data:
        raise InvalidInputError("empty image: 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=tuple(ACCEPTED_FORMATS))
            frames = int(getattr(img, "n_frames", 1))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooManyPixelsError(f"image has more pixels than the limit of {max_pixels}") from None
    except UnidentifiedImageError:
        other = _refused_format(data)
        if other is not None:
            raise UnsupportedFormatError(f"{other} images are not accepted; send PNG, JPEG or WebP") from None
        raise InvalidInputError("not a decodable image (expected PNG, JPEG or WebP)") from None
    except Exception as exc:  # noqa: BLE001 - a decoder on untrusted bytes may raise anything
        raise _corrupt(exc) from None
    w, h = img.size
    if w * h > max_pixels:
        raise TooManyPixelsError(f"image has {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
    if frames > 1:
        raise InvalidInputError(f"an animated image ({frames} frames) is not a grid; send one still image")
    return img


def image_to_array(img: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> ``float32 [H, W, 3]`` in ``[0, 1]``, alpha composited over white."""
    mode = img.mode
    try:
        if mode.startswith("I;16"):
            grey = np.asarray(img).astype(np.float32) / 65535.0
        elif mode == "I":
            arr = np.asarray(img).astype(np.float64)
            top = 65535.0 if arr.max(initial=0) <= 65535 else float(np.iinfo(np.int32).max)
            grey = (np.clip(arr, 0, top) / top).astype(np.float32)
        elif mode == "F":
            grey = np.asarray(img, dtype=np.float32)
            if not np.isfinite(grey).all():
                raise InvalidInputError("the image holds NaN or infinite pixel values")
            grey = np.clip(grey, 0.0, 1.0)
        elif mode == "RGB":
            return np.asarray(img).astype(np.float32) / 255.0
        else:
            rgba = np.asarray(img if mode in _PREMULTIPLIED else img.convert("RGBA")).astype(np.float32) / 255.0
            colour, alpha = rgba[..., :-1], rgba[..., -1:]
            if mode not in _PREMULTIPLIED:
                colour *= alpha  # straight alpha: premultiply, then both composite the same way
            colour += 1.0 - alpha  # over white
            rgb = np.clip(colour, 0.0, 1.0)
            return rgb if rgb.shape[-1] == 3 else np.repeat(rgb, 3, axis=-1)
    except InvalidInputError:
        raise
    except (ValueError, OSError) as exc:  # a mode Pillow cannot convert, or pixels it cannot read
        raise InvalidInputError(f"pixel mode {mode!r} cannot be read as RGB: {exc}") from None
    return np.repeat(grey[..., None], 3, axis=-1)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes into ``float32 [H, W, 3]`` in ``[0, 1]`` at full resolution."""
    img = open_image(data, max_pixels=max_pixels)
    _load(img)
    return image_to_array(img)


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode an image file (see :func:`decode_image`)."""
    path = Path(path)
    return _with_path(path, lambda: decode_image(_read(path), max_pixels=max_pixels))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read: {exc.strerror or exc}") from None


def _with_path(path: Path, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except InvalidInputError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001 - a decoder on untrusted bytes may raise anything
        raise _corrupt(exc) from None


# -- the metric's input: a grid at the working resolution ------------------------------------------
def working_view_size(view_px: int, view_size: int | None) -> int:
    """The side of a view once decoded: views larger than the working size are reduced to it."""
    return view_px if view_size is None or view_px <= view_size else view_size


def resize_views(views: Tensor, size: int) -> Tensor:
    """Resample views ``[..., 3, h, w]`` to ``size x size`` (bicubic, antialiased, clamped to [0, 1])."""
    *lead, c, h, w = views.shape
    if h == size and w == size:
        return views
    flat = views.reshape(-1, c, h, w).contiguous()
    out = F.interpolate(flat, size=(size, size), mode="bicubic", antialias=True).clamp(0.0, 1.0)
    return out.reshape(*lead, c, size, size)


def _assemble(
    height: int,
    width: int,
    layout: GridLayout,
    view_size: int | None,
    tile: Callable[[tuple[int, int, int, int]], Tensor],
) -> np.ndarray:
    """``tile(box) -> float32 [3, h, w]`` of each view -> the ``uint8`` grid at the working resolution.

    The callers have checked the size (:func:`check_grid_size`).
    """
    view_px = height // layout.rows
    size = working_view_size(view_px, view_size)
    out = np.empty((layout.rows * size, layout.cols * size, 3), dtype=np.uint8)
    for r in range(layout.rows):
        for c in range(layout.cols):
            view = resize_views(tile((c * view_px, r * view_px, (c + 1) * view_px, (r + 1) * view_px)), size)
            out[r * size : (r + 1) * size, c * size : (c + 1) * size] = to_uint8(view.permute(1, 2, 0)).numpy()
    return out


def _chw(pixels: np.ndarray) -> Tensor:
    """``[h, w, 3]`` uint8 or float in [0, 1] -> contiguous ``float32 [3, h, w]`` (uint8 permuted before widening)."""
    if not (pixels.flags.writeable and pixels.flags.c_contiguous):
        pixels = np.array(pixels)  # torch wants writable, contiguous memory
    t = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    return t.to(torch.float32).div_(255.0) if t.dtype == torch.uint8 else t


def _view_of(img: Image.Image) -> Tensor:
    return _chw(np.asarray(img) if img.mode == "RGB" else image_to_array(img))


def grid_from_image(img: Image.Image, layout: GridLayout, *, view_size: int | None) -> np.ndarray:
    """An opened image (:func:`open_image`) -> ``uint8 [H', W', 3]`` grid at the working resolution.

    Each view is cut, converted and resampled on its own, so the float copy
    of a view is the largest buffer besides Pillow's decoded image.
    """
    width, height = img.size
    check_grid_size(height, width, layout)  # from the header, before decoding
    _load(img)
    if img.mode == "RGB" and working_view_size(height // layout.rows, view_size) == height // layout.rows:
        return np.array(img)  # 8-bit RGB at most the working size: the pixels as they are
    return _assemble(height, width, layout, view_size, lambda box: _view_of(img.crop(box)))


def grid_from_array(grid: np.ndarray, layout: GridLayout, *, view_size: int | None) -> np.ndarray:
    """``uint8 [H, W, 3]`` pixels -> the same grid at the working resolution (a no-op when not larger)."""
    height, width = grid.shape[:2]
    check_grid_size(height, width, layout)
    if working_view_size(height // layout.rows, view_size) == height // layout.rows:
        return grid
    return _assemble(height, width, layout, view_size, lambda b: _chw(grid[b[1] : b[3], b[0] : b[2]]))


def decode_grid(
    data: bytes, layout: GridLayout, *, view_size: int | None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Image bytes -> the metric's input: a ``uint8 [H', W', 3]`` grid at the working resolution."""
    return grid_from_image(open_image(data, max_pixels=max_pixels), layout, view_size=view_size)


def load_grid(
    path: str | Path, layout: GridLayout, *, view_size: int | None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """:func:`decode_grid` of a file; errors name the file."""
    path = Path(path)
    return _with_path(path, lambda: decode_grid(_read(path), layout, view_size=view_size, max_pixels=max_pixels))


def to_grid_tensor(grids: np.ndarray | Tensor) -> Tensor:
    """``[H, W, 3]`` or ``[B, H, W, 3]`` (uint8 or float in [0, 1]) -> ``float32 [B, 3, H, W]``."""
    t = torch.as_tensor(np.asarray(grids) if not isinstance(grids, Tensor) else grids)
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[-1] != 3:
        raise InvalidInputError(f"expected grids of shape [H, W, 3] or [B, H, W, 3], got {list(t.shape)}")
    if t.dtype == torch.uint8:
        t = t.to(torch.float32) / 255.0
    elif t.is_floating_point():
        t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise InvalidInputError("grid contains NaN or infinite values")
        t = t.clamp(0.0, 1.0)
    else:
        raise InvalidInputError(f"expected uint8 or float grids, got {t.dtype}")
    return t.permute(0, 3, 1, 2).contiguous()


def check_grid_size(height: int, width: int, layout: GridLayout) -> None:
    """Raise a clear error unless a ``height x width`` grid splits into square views."""
    if height % layout.rows or width % layout.cols:
        raise InvalidInputError(
            f"grid of {width}x{height} pixels does not split into {layout.rows}x{layout.cols} equal tiles "
            f"(height must be a multiple of {layout.rows}, width of {layout.cols})"
        )
    vh, vw = height // layout.rows, width // layout.cols
    if vh != vw:
        raise InvalidInputError(f"views must be square, got {vw}x{vh} tiles from a {width}x{height} grid")
    if vh < MIN_VIEW_SIZE:
        raise InvalidInputError(f"views of {vw}x{vh} pixels are too small (minimum {MIN_VIEW_SIZE}x{MIN_VIEW_SIZE})")


def split_grid(grids: Tensor, layout: GridLayout) -> Tensor:
    """``[B, C, H, W]`` -> views ``[B, V, C, H/rows, W/cols]`` in row-major tile order."""
    b, c, h, w = grids.shape
    check_grid_size(h, w, layout)
    r, k = layout.rows, layout.cols
    views = grids.reshape(b, c, r, h // r, k, w // k).permute(0, 2, 4, 1, 3, 5)
    return views.reshape(b, r * k, c, h // r, w // k)


def join_grid(views: Tensor, layout: GridLayout) -> Tensor:
    """Inverse of :func:`split_grid`: ``[B, V, C, h, w]`` -> ``[B, C, rows*h, cols*w]``."""
    b, v, c, h, w = views.shape
    r, k = layout.rows, layout.cols
    if v != r * k:
        raise InvalidInputError(f"layout {layout.name!r} has {r * k} views, got {v}")
    return views.reshape(b, r, k, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(b, c, r * h, k * w)


def to_uint8_image(image: Tensor) -> np.ndarray:
    """``[3, H, W]`` float in [0, 1] -> ``uint8 [H, W, 3]`` (for PNG writing)."""
    return to_uint8(image.permute(1, 2, 0)).cpu().numpy()
