"""Grids: decode image bytes or arrays into float tensors and split them into views.

Accepted inputs and the conversions applied (documented, never silent failures):

* PNG, JPEG, WebP, BMP, TIFF bytes or files; numpy/torch ``uint8`` arrays
  ``[H, W, 3]`` or ``[B, H, W, 3]``; float arrays in ``[0, 1]``.
* Grayscale is replicated to RGB; palette images are expanded; CMYK is
  converted to RGB; an alpha channel is composited over **white** (the
  metric's background); 16-bit and 32-bit images are scaled to ``[0, 1]``
  from their full range.
* Anything else (undecodable bytes, more pixels than ``max_pixels``, sizes
  that do not divide into the layout, views smaller than 16 px) raises
  :class:`~carve3d_reward.errors.InvalidInputError` naming the problem.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .errors import InvalidInputError
from .layouts import GridLayout

MIN_VIEW_SIZE = 16
DEFAULT_MAX_PIXELS = 4096 * 4096
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
#: The only decoders ever run on untrusted bytes (a smaller attack surface than every format Pillow knows).
DECODED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")


class TooManyPixelsError(InvalidInputError):
    """The image declares more pixels than allowed (a decompression-bomb guard)."""


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes into ``float32 [H, W, 3]`` in ``[0, 1]``.

    The pixel count is checked from the header before any pixel is decoded,
    so a decompression bomb costs nothing.
    """
    if not data:
        raise InvalidInputError("empty image: 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise TooManyPixelsError(f"image has {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
            img.load()
    except InvalidInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooManyPixelsError(f"image rejected as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidInputError("not a decodable image (expected PNG, JPEG, WebP, BMP or TIFF)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
        raise InvalidInputError(f"corrupt or truncated image: {exc}") from None
    return pil_to_array(img)


def pil_to_array(img: Image.Image) -> np.ndarray:
    """A PIL image of any common mode -> ``float32 [H, W, 3]`` in ``[0, 1]``, alpha over white."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.float32) / 65535.0
        return np.repeat(arr[..., None], 3, axis=-1)
    if mode == "I":
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if arr.max(initial=0) <= 65535 else float(np.iinfo(np.int32).max)
        return np.repeat((np.clip(arr, 0, top) / top).astype(np.float32)[..., None], 3, axis=-1)
    if mode == "F":
        arr = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=-1)
    if mode == "RGB":
        return np.asarray(img, dtype=np.float32) / 255.0
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    return rgb * alpha + (1.0 - alpha)


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode an image file (see :func:`decode_image`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return decode_image(data, max_pixels=max_pixels)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{path}: {exc}") from None


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
    return (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
