"""Contact sheets: see why a grid scored as it did.

One PNG per grid; one row per view: the input with its box drawn, the
re-render, the two crops the distance compared, and their absolute difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..bbox import crop_resize
from ..grid import to_uint8_image
from ..metric import MRCResult

COLUMNS = ("input", "re-render", "input crop", "re-render crop", "|difference| x4")
_PAD = 4
_HEADER = 36


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def grid_sheet(result: MRCResult, i: int, title: str = "") -> Image.Image:
    """The sheet of grid ``i`` of a result computed with ``return_renders=True``."""
    if result.views is None or result.renders is None:
        raise ValueError("the result holds no renders: score with return_renders=True")
    views, renders, boxes = result.views[i], result.renders[i], result.boxes[i]
    v, _, size, _ = views.shape
    crops_in = crop_resize(views, boxes, size)
    crops_out = crop_resize(renders, boxes, size)
    diff = ((crops_in - crops_out).abs() * 4).clamp(0, 1)
    label_w = 120
    cols = len(COLUMNS)
    width = label_w + cols * (size + _PAD) + _PAD
    height = _HEADER + 16 + v * (size + _PAD) + _PAD
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    score = result.scores()[i]
    head = f"{title}  MRC {score.mrc:.4f}  status {score.status}".strip()
    draw.text((_PAD, 4), head, fill=(0, 0, 0), font=_font(14))
    draw.text((_PAD, 20), result.metric_id, fill=(90, 90, 90), font=_font(11))
    for c, name in enumerate(COLUMNS):
        draw.text((label_w + c * (size + _PAD) + _PAD, _HEADER), name, fill=(60, 60, 60), font=_font(11))
    for row in range(v):
        y = _HEADER + 16 + row * (size + _PAD) + _PAD
        view = score.views[row]
        text = f"view {row}\nd = {view.distance:.4f}" + ("\nEMPTY" if view.empty else "")
        draw.text((_PAD, y + 4), text, fill=(200, 0, 0) if view.empty else (0, 0, 0), font=_font(12))
        tiles = (views[row], renders[row], crops_in[row], crops_out[row], diff[row])
        for c, tile in enumerate(tiles):
            x = label_w + c * (size + _PAD) + _PAD
            sheet.paste(Image.fromarray(to_uint8_image(tile)), (x, y))
        x0, y0, x1, y1 = (int(t) for t in boxes[row])
        left = label_w + _PAD
        draw.rectangle(
            (left + max(x0, 0), y + max(y0, 0), left + min(x1, size - 1), y + min(y1, size - 1)),
            outline=(255, 0, 0),
        )
    return sheet


def save_sheets(result: MRCResult, names: list[str], out_dir: Path) -> list[Path]:
    """Write one ``<name>.sheet.png`` per grid into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        path = out_dir / f"{Path(name).stem}.sheet.png"
        grid_sheet(result, i, title=Path(name).name).save(path)
        paths.append(path)
    return paths


def save_grid_png(grid: torch.Tensor, path: Path) -> None:
    """Write a ``[3, H, W]`` grid in ``[0, 1]`` as an 8-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(to_uint8_image(grid))).save(path)
