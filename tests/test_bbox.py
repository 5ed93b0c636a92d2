"""Tests for bounding-box normalisation (foreground boxes, crop + antialiased bicubic resize)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from carve3d_reward.bbox import crop_resize, foreground_boxes

SIZE = 64


def _white(n: int = 1, h: int = SIZE, w: int = SIZE) -> Tensor:
    return torch.ones(n, 3, h, w)


def _with_rect(y0: int, y1: int, x0: int, x1: int, h: int = SIZE, w: int = SIZE) -> Tensor:
    """One white view with a dark inclusive rectangle rows y0..y1, cols x0..x1."""
    views = _white(1, h, w)
    views[0, :, y0 : y1 + 1, x0 : x1 + 1] = 0.2
    return views


def _reference_crop(image: Tensor, box: Tensor, size: int, clamp: bool = True) -> Tensor:
    """The per-sample definition: pad with white, slice the inclusive box, resize with F.interpolate."""
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = image.shape[-2:]
    p = max(0, -x0, -y0, x1 - w + 1, y1 - h + 1)
    padded = F.pad(image[None], (p, p, p, p), value=1.0)
    crop = padded[:, :, y0 + p : y1 + p + 1, x0 + p : x1 + p + 1]
    out = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
    return out.clamp(0, 1) if clamp else out


# --- foreground_boxes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rect", "expected"),
    [
        # rows 10..19 (h=10), cols 20..35 (w=16): even diff 6 -> 3 up, 3 down; pad 5.
        ((10, 19, 20, 35), (15, 2, 40, 27)),
        # rows 10..19 (h=10), cols 20..36 (w=17): odd diff 7 -> 4 up (top takes the odd pixel), 3 down.
        ((10, 19, 20, 36), (15, 1, 41, 27)),
        # rows 30..46 (h=17), cols 5..14 (w=10): odd diff 7 -> 4 left, 3 right; box leaves the image (x < 0).
        ((30, 46, 5, 14), (-4, 25, 22, 51)),
        # already square 4x4 in the corner: pad only, negative indices kept.
        ((0, 3, 0, 3), (-5, -5, 8, 8)),
        # single pixel in the bottom-right corner: box extends past W-1 and H-1.
        ((63, 63, 63, 63), (58, 58, 68, 68)),
    ],
)
def test_hand_computed_boxes(rect: tuple[int, int, int, int], expected: tuple[int, int, int, int]) -> None:
    boxes, empty = foreground_boxes(_with_rect(*rect))
    assert boxes.dtype == torch.int64
    assert boxes.shape == (1, 4)
    assert boxes[0].tolist() == list(expected)
    assert not bool(empty[0])
    x0, y0, x1, y1 = expected
    assert x1 - x0 == y1 - y0  # square


def test_pad_argument() -> None:
    boxes, _ = foreground_boxes(_with_rect(10, 19, 20, 35), pad=0)
    assert boxes[0].tolist() == [20, 7, 35, 22]
    boxes, _ = foreground_boxes(_with_rect(10, 19, 20, 35), pad=2)
    assert boxes[0].tolist() == [18, 5, 37, 24]


def test_empty_view_gets_whole_image_box() -> None:
    h, w = 48, 64
    views = torch.cat([_white(1, h, w), torch.full((1, 3, h, w), 0.97), _with_rect(5, 9, 5, 9, h, w)])
    boxes, empty = foreground_boxes(views)
    assert empty.dtype == torch.bool
    assert empty.tolist() == [True, True, False]
    assert boxes[0].tolist() == [0, 0, w - 1, h - 1]
    assert boxes[1].tolist() == [0, 0, w - 1, h - 1]
    assert boxes[2].tolist() == [0, 0, 14, 14]


def test_threshold_edge_and_any_channel() -> None:
    at = _white()
    at[0, 1, 20, 30] = 0.95  # exactly at the threshold: background
    boxes, empty = foreground_boxes(at)
    assert bool(empty[0])
    assert boxes[0].tolist() == [0, 0, SIZE - 1, SIZE - 1]

    below = _white()
    below[0, 1, 20, 30] = 0.949  # one channel below: foreground (the others stay white)
    boxes, empty = foreground_boxes(below)
    assert not bool(empty[0])
    assert boxes[0].tolist() == [25, 15, 35, 25]

    boxes, empty = foreground_boxes(below, threshold=0.9)
    assert bool(empty[0])


def test_batched_equals_per_sample() -> None:
    gen = torch.Generator().manual_seed(0)
    views = _white(12)
    for k in range(12):
        if k % 5 == 4:
            continue  # leave some views empty
        y0, x0 = torch.randint(0, SIZE, (2,), generator=gen).tolist()
        hh, ww = torch.randint(1, 30, (2,), generator=gen).tolist()
        views[k, k % 3, y0 : y0 + hh, x0 : x0 + ww] = torch.rand(1, generator=gen).item() * 0.9
    boxes, empty = foreground_boxes(views)
    assert empty.tolist() == [k % 5 == 4 for k in range(12)]
    for k in range(12):
        b, e = foreground_boxes(views[k : k + 1])
        assert torch.equal(b[0], boxes[k])
        assert bool(e[0]) == bool(empty[k])
        if not bool(e[0]):
            x0, y0, x1, y1 = b[0].tolist()
            assert x1 - x0 == y1 - y0


# --- crop_resize ------------------------------------------------------------------------------------------------------


def test_identity_whole_image() -> None:
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[0, 0, SIZE - 1, SIZE - 1]] * 3)
    out = crop_resize(images, boxes, SIZE)
    assert out.shape == images.shape
    torch.testing.assert_close(out, images, atol=1e-6, rtol=0)


def test_box_over_border_reads_white() -> None:
    # Box from a view with an object in the bottom-right corner; crop a grey (not white) "render" with it.
    view = _white()
    view[0, :, 58:, 60:] = 0.1
    boxes, empty = foreground_boxes(view)
    assert not bool(empty[0])
    x0, y0, x1, y1 = boxes[0].tolist()
    assert x1 >= SIZE and y1 >= SIZE  # not clamped
    side = x1 - x0 + 1
    assert y1 - y0 + 1 == side
    render = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * 0.5
    out = crop_resize(render, boxes, side)  # scale 1: each output pixel is one crop pixel
    inside_h, inside_w = SIZE - y0, SIZE - x0
    torch.testing.assert_close(out[0, :, :inside_h, :inside_w], render[0, :, y0:, x0:], atol=1e-6, rtol=0)
    assert torch.all(out[0, :, inside_h:, :] == 1.0)
    assert torch.all(out[0, :, :, inside_w:] == 1.0)
    torch.testing.assert_close(out[0], _reference_crop(render[0], boxes[0], side), atol=1e-5, rtol=0)


def _random_boxes(gen: torch.Generator, n: int, lo: int, hi: int, outside: bool) -> Tensor:
    rows = []
    for _ in range(n):
        bw, bh = torch.randint(lo, hi + 1, (2,), generator=gen).tolist()
        if outside:  # start anywhere so that the box crosses some border
            x0 = int(torch.randint(-bw + 1, SIZE, (1,), generator=gen))
            y0 = int(torch.randint(-bh + 1, SIZE, (1,), generator=gen))
        else:
            bw, bh = min(bw, SIZE), min(bh, SIZE)
            x0 = int(torch.randint(0, SIZE - bw + 1, (1,), generator=gen))
            y0 = int(torch.randint(0, SIZE - bh + 1, (1,), generator=gen))
        rows.append([x0, y0, x0 + bw - 1, y0 + bh - 1])
    return torch.tensor(rows, dtype=torch.int64)


@pytest.mark.parametrize("outside", [False, True], ids=["inside", "partly-outside"])
@pytest.mark.parametrize(
    ("size", "lo", "hi"),
    [
        (24, 30, 80),  # downscaling, non-integer factors (boxes up to 80 px > image)
        (96, 7, 60),  # upscaling, non-integer factors
        (37, 20, 55),  # mixed: some up, some down
    ],
    ids=["down", "up", "mixed"],
)
def test_crop_resize_matches_per_sample_interpolate(size: int, lo: int, hi: int, outside: bool) -> None:
    gen = torch.Generator().manual_seed(size * 2 + outside)
    n = 8
    images = torch.rand(n, 3, SIZE, SIZE, generator=gen)
    boxes = _random_boxes(gen, n, lo, hi, outside)
    out = crop_resize(images, boxes, size)
    assert out.shape == (n, 3, size, size)
    for k in range(n):
        torch.testing.assert_close(out[k], _reference_crop(images[k], boxes[k], size), atol=1e-5, rtol=0)


def test_crop_resize_non_square_image_and_boxes() -> None:
    gen = torch.Generator().manual_seed(7)
    images = torch.rand(4, 1, 40, 56, generator=gen)
    boxes = torch.tensor([[0, 0, 55, 39], [-10, 5, 30, 60], [50, -3, 70, 10], [3, 3, 3, 3]])
    out = crop_resize(images, boxes, 33)
    for k in range(4):
        torch.testing.assert_close(out[k], _reference_crop(images[k], boxes[k], 33), atol=1e-5, rtol=0)


def test_output_is_clamped() -> None:
    # A 0/1 checkerboard overshoots under bicubic upsampling; the result must stay in [0, 1].
    board = ((torch.arange(SIZE)[:, None] // 4 + torch.arange(SIZE)[None, :] // 4) % 2).float()
    images = board.expand(2, 3, SIZE, SIZE).contiguous()
    boxes = torch.tensor([[0, 0, 31, 31], [-8, -8, 20, 20]])
    raw = _reference_crop(images[0], boxes[0], 96, clamp=False)
    assert raw.min() < 0.0 and raw.max() > 1.0  # the unclamped resize does leave [0, 1]
    out = crop_resize(images, boxes, 96)
    assert out.min() >= 0.0 and out.max() <= 1.0
    torch.testing.assert_close(out[0], raw.clamp(0, 1), atol=1e-5, rtol=0)


def test_pipeline_on_boxes_from_foreground_boxes() -> None:
    # The two functions together, batched, as the metric uses them.
    gen = torch.Generator().manual_seed(3)
    views = _white(6)
    for k in range(5):
        y0, x0 = torch.randint(-5, SIZE - 5, (2,), generator=gen).clamp(min=0).tolist()
        views[k, :, y0 : y0 + 10 + 4 * k, x0 : x0 + 25 - 3 * k] = torch.rand(3, 1, 1, generator=gen) * 0.8
    boxes, empty = foreground_boxes(views)
    assert empty.tolist() == [False] * 5 + [True]
    out = crop_resize(views, boxes, 48)
    for k in range(6):
        torch.testing.assert_close(out[k], _reference_crop(views[k], boxes[k], 48), atol=1e-5, rtol=0)


def test_invalid_inputs_raise() -> None:
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="x_max >= x_min"):
        crop_resize(images, torch.tensor([[0, 0, 15, 15], [5, 0, 4, 15]]), 8)
    with pytest.raises(ValueError, match="boxes must be"):
        crop_resize(images, torch.tensor([[0, 0, 15, 15]]), 8)
    with pytest.raises(ValueError, match="views must be"):
        foreground_boxes(torch.rand(3, 16, 16))
