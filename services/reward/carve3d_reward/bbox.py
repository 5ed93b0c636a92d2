"""Bounding-box normalisation: crop each view to its object before comparing.

Without it the metric could be gamed by shrinking the object (less area, less
distance). Boxes are computed on the *input* view and applied to both the
input and its re-render, so the two crops cover the same pixels.

Boxes are square and are **not** clamped at the image border: whatever lies
outside the image is white (the metric's background), so a crop near the
border is never stretched. Everything is vectorised over the batch; the
resize reproduces ``F.interpolate(..., mode="bicubic", antialias=True)`` on a
white-padded crop, per sample, without materialising any crop.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["crop_resize", "foreground_boxes"]

_CUBIC_A = -0.5  # PyTorch's (and PIL's) antialiased bicubic uses Keys' a = -0.5, not the -0.75 of plain bicubic


def foreground_boxes(views: Tensor, threshold: float = 0.95, pad: int = 5) -> tuple[Tensor, Tensor]:
    """Square, padded foreground boxes of ``views`` (float ``[N, 3, H, W]`` in ``[0, 1]``).

    A pixel is foreground when *any* channel is ``< threshold`` (near-white is
    background). The tight inclusive box grows its shorter side to a square,
    the odd remainder going to the top/left, then ``pad`` pixels are added on
    every side; the result may extend past the image on purpose (see module
    docstring).

    Returns ``(boxes, empty)``: ``boxes`` int64 ``[N, 4]`` as inclusive
    ``(x_min, y_min, x_max, y_max)`` and ``empty`` bool ``[N]``. An empty view
    gets the whole image ``(0, 0, W-1, H-1)`` so later steps stay finite; the
    caller decides what an empty view scores.
    """
    if views.ndim != 4:
        raise ValueError(f"views must be [N, C, H, W], got shape {tuple(views.shape)}")
    n, _, h, w = views.shape
    mask = (views < threshold).any(dim=1)  # [N, H, W]
    rows = mask.any(dim=2)  # [N, H]
    cols = mask.any(dim=1)  # [N, W]
    empty = ~rows.any(dim=1)

    ys = torch.arange(h, device=views.device)
    xs = torch.arange(w, device=views.device)
    # First/last True index; an empty row of flags gives h (or -1), replaced below.
    y_min = torch.where(rows, ys, h).amin(dim=1)
    y_max = torch.where(rows, ys, -1).amax(dim=1)
    x_min = torch.where(cols, xs, w).amin(dim=1)
    x_max = torch.where(cols, xs, -1).amax(dim=1)

    height = y_max - y_min + 1
    width = x_max - x_min + 1
    diff = (height - width).abs()
    big = (diff + 1) // 2  # ceil: the top/left side takes the odd pixel
    small = diff // 2
    grow_y = height < width
    grow_x = width < height
    y_min = y_min - torch.where(grow_y, big, 0) - pad
    y_max = y_max + torch.where(grow_y, small, 0) + pad
    x_min = x_min - torch.where(grow_x, big, 0) - pad
    x_max = x_max + torch.where(grow_x, small, 0) + pad

    boxes = torch.stack([x_min, y_min, x_max, y_max], dim=1).to(torch.int64)
    whole = torch.tensor([0, 0, w - 1, h - 1], dtype=torch.int64, device=views.device).expand(n, 4)
    boxes = torch.where(empty[:, None], whole, boxes)
    return boxes, empty


def crop_resize(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop ``images`` (float ``[N, C, H, W]``) to ``boxes`` and resize to ``[N, C, size, size]``, clamped to [0, 1].

    ``boxes`` are inclusive ``(x_min, y_min, x_max, y_max)`` per sample and
    may extend outside the image, where the image counts as white (1.0).
    The result equals, per sample, white-padding the image, slicing the box
    and calling ``F.interpolate(crop, (size, size), mode="bicubic",
    align_corners=False, antialias=True).clamp(0, 1)``; it is computed as
    ``Wy @ image @ Wx^T`` with per-sample separable resampling matrices, so no
    crop of a different size per sample is ever built.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    if boxes.shape != (n, 4):
        raise ValueError(f"boxes must be [{n}, 4], got shape {tuple(boxes.shape)}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    boxes = boxes.to(device=images.device, dtype=torch.int64)
    x_min, y_min, x_max, y_max = boxes.unbind(dim=1)
    if bool(((x_max < x_min) | (y_max < y_min)).any()):
        raise ValueError("every box needs x_max >= x_min and y_max >= y_min")

    wy, sy = _resample_matrix(y_min, y_max - y_min + 1, h, size)  # [N, size, H], [N, size]
    wx, sx = _resample_matrix(x_min, x_max - x_min + 1, w, size)  # [N, size, W], [N, size]
    wy = wy.to(images.dtype)[:, None]
    wx = wx.to(images.dtype)[:, None]
    # Taps that fall outside the image read white; normalised weights make their total 1 - sy * sx.
    white = (1.0 - sy[:, :, None] * sx[:, None, :]).to(images.dtype)[:, None]  # [N, 1, size, size]
    out = (wy @ images) @ wx.transpose(-1, -2)
    return out.add_(white).clamp_(0.0, 1.0)


def _cubic(x: Tensor) -> Tensor:
    """Keys' cubic convolution kernel with ``a = -0.5`` (support [-2, 2])."""
    a = _CUBIC_A
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _resample_matrix(start: Tensor, length: Tensor, extent: int, size: int) -> tuple[Tensor, Tensor]:
    """Per-sample antialiased bicubic weights from a virtual crop onto real image indices.

    Sample ``k``'s crop covers image indices ``start[k] .. start[k] + length[k] - 1``
    along one axis of ``extent`` pixels. Weights follow PyTorch's antialias path
    (``_compute_indices_min_size_weights_aa``): ``scale = length / size``,
    centre ``scale * (i + 0.5)``, support ``2 * max(scale, 1)``, kernel
    argument divided by ``max(scale, 1)``, taps clipped to the crop and
    normalised per output pixel. Returns the weights on in-image indices
    ``[N, size, extent]`` and their per-row sums ``[N, size]`` (1 minus the
    share read from outside the image).
    """
    dtype = torch.float64 if start.device.type != "mps" else torch.float32
    n = start.shape[0]
    length_f = length.to(dtype)
    scale = (length_f / size)[:, None]  # [N, 1]
    support = 2.0 * scale.clamp(min=1.0)
    invscale = 1.0 / scale.clamp(min=1.0)
    centre = scale * (torch.arange(size, device=start.device, dtype=dtype) + 0.5)  # [N, size]
    lo = torch.floor(centre - support + 0.5).clamp(min=0).to(torch.int64)
    hi = torch.minimum(torch.floor(centre + support + 0.5).to(torch.int64), length[:, None])
    taps = int((hi - lo).max().item()) if n > 0 else 1
    j = lo[..., None] + torch.arange(max(taps, 1), device=start.device)  # [N, size, K] crop indices
    in_crop = j < hi[..., None]
    weight = _cubic((j.to(dtype) - centre[..., None] + 0.5) * invscale[..., None]) * in_crop
    total = weight.sum(dim=-1, keepdim=True)
    weight = weight / torch.where(total == 0, torch.ones_like(total), total)

    src = start[:, None, None] + j  # image indices
    in_image = in_crop & (src >= 0) & (src < extent)
    weight = weight * in_image
    matrix = torch.zeros(n, size, extent, device=start.device, dtype=dtype)
    matrix.scatter_add_(2, src.clamp(0, extent - 1), weight)
    return matrix, weight.sum(dim=-1)
