"""The camera picture, and the proof it shows, checked on pixels.

The expectations below are written from the convention in ``cameras.py``
(azimuth counter-clockwise from +x towards +y, camera +x = image right, world
+z = image up), never computed from the code under test: tile 0 (azimuth 0)
looks from +x, so world +y is on its image right; tile 1 (azimuth 90) looks
from +y, so world -x is on its image right; and so on round the circle.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from torch import Tensor

from carve3d_reward.layouts import INSTANT3D_2X2
from carve3d_reward.tools.camera_figure import (
    AXIS_MARKERS,
    axis_marker_scene,
    expected_sides,
    render_axis_markers,
    write_camera_figure,
)

S = 64  # view size for the pixel checks (small: fast)
C = S / 2

#: Where each marker must appear, per tile of the default 2x2 layout (azimuth0 = 0).
EXPECTED = [
    {"+x": "front", "+y": "RIGHT", "-x": "behind", "+z": "top"},  # TL, azimuth 0: looks from +x
    {"+x": "LEFT", "+y": "front", "-x": "RIGHT", "+z": "top"},  # TR, azimuth 90: looks from +y
    {"+x": "behind", "+y": "LEFT", "-x": "front", "+z": "top"},  # BL, azimuth 180: looks from -x
    {"+x": "RIGHT", "+y": "behind", "-x": "LEFT", "+z": "top"},  # BR, azimuth 270: looks from -y
]


def _masks(views: Tensor) -> dict[str, Tensor]:
    """Pixels of each marker colour, ``[V, S, S]`` bool, from simple channel rules."""
    r, g, b = views.unbind(1)
    return {
        "+x": (r > 0.3) & (r > 2.5 * g) & (r > 2.5 * b),  # red
        "+y": (g > 0.25) & (g > 1.8 * r) & (g > 1.8 * b),  # green
        "+z": (b > 0.3) & (b > 1.8 * r) & (b > 1.8 * g),  # blue
        "-x": (r > 0.3) & (g > 0.6 * r) & (b < 0.35 * g),  # yellow
    }


def _centroid(mask: Tensor) -> tuple[float, float]:
    """``(u, v)`` of a mask's pixel centres."""
    vs, us = torch.nonzero(mask, as_tuple=True)
    return float(us.float().mean()) + 0.5, float(vs.float().mean()) + 0.5


@pytest.fixture(scope="module")
def rendered() -> tuple[Tensor, dict[str, Tensor]]:
    views, _ = render_axis_markers(view_size=S)
    return views, _masks(views)


def test_figure_is_written(tmp_path: Path) -> None:
    out = write_camera_figure(tmp_path / "sub" / "cameras.png", view_size=64)
    assert out == tmp_path / "sub" / "cameras.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert 1000 <= width <= 4000 and 600 <= height <= 3000
    assert len(data) > 30_000  # a drawing, not an empty canvas


def test_scene_is_one_grey_ball_with_coloured_axis_markers() -> None:
    scene = axis_marker_scene()
    assert len(scene) == 1
    centres = scene.centres[0]
    torch.testing.assert_close(centres[0], torch.zeros(3))  # the grey ball sits on the origin
    for marker in AXIS_MARKERS:
        hit = (centres - torch.tensor(marker.position)).norm(dim=-1) < 1e-5
        assert hit.sum() == 1, marker.label
    assert {m.label for m in AXIS_MARKERS} == {"+x", "+y", "+z", "-x"}  # nothing on -y


def test_tile0_looks_from_plus_x_with_plus_y_on_image_right(rendered: tuple[Tensor, dict[str, Tensor]]) -> None:
    _, masks = rendered
    green, red = masks["+y"][0], masks["+x"][0]
    assert green.sum() > 20 and red.sum() > 20
    u, _ = _centroid(green)
    assert u > C + 0.2 * S  # +y on the image RIGHT
    assert not green[:, : S // 2].any()  # and nothing green on the left
    u, v = _centroid(red)
    assert abs(u - C) < 1.5 and v > C  # +x straight in front (below centre: the camera looks down 20 deg)
    left = torch.stack([m[0, :, : int(C - 0.2 * S)] for m in masks.values()])
    assert not left.any()  # the -y side (left) holds no marker at all


def test_plus_z_is_on_top_in_every_tile(rendered: tuple[Tensor, dict[str, Tensor]]) -> None:
    _, masks = rendered
    for i in range(4):
        blue = masks["+z"][i]
        assert blue.sum() > 20, i
        u, v = _centroid(blue)
        assert v < C - 0.2 * S, i  # smaller v = higher in the image
        assert abs(u - C) < 1.5, i


def test_tile1_looks_from_plus_y_with_minus_x_on_image_right(rendered: tuple[Tensor, dict[str, Tensor]]) -> None:
    _, masks = rendered
    u_yellow, _ = _centroid(masks["-x"][1])
    u_red, _ = _centroid(masks["+x"][1])
    u_green, v_green = _centroid(masks["+y"][1])
    assert u_yellow > C + 0.2 * S  # -x on the image right
    assert u_red < C - 0.2 * S  # +x on the image left
    assert abs(u_green - C) < 1.5 and v_green > C  # +y in front


@pytest.mark.parametrize("tile", range(4))
def test_every_tile_matches_the_convention(rendered: tuple[Tensor, dict[str, Tensor]], tile: int) -> None:
    _, masks = rendered
    for label, where in EXPECTED[tile].items():
        mask = masks[label][tile]
        if where == "behind":  # hidden (mostly) by the grey ball
            assert mask.sum() < 0.3 * masks[label].sum(dim=(1, 2)).max(), (tile, label)
            continue
        assert mask.sum() > 20, (tile, label)
        u, v = _centroid(mask)
        if where == "RIGHT":
            assert u > C + 0.2 * S, (tile, label, u)
        elif where == "LEFT":
            assert u < C - 0.2 * S, (tile, label, u)
        elif where == "front":
            assert abs(u - C) < 1.5 and v > C, (tile, label, u, v)
        else:  # top
            assert v < C - 0.2 * S, (tile, label, v)


def test_captions_state_the_same_expectations() -> None:
    cams = INSTANT3D_2X2.cameras(radius=2.7, fov_deg=50.0)
    assert expected_sides(cams) == EXPECTED


def test_pixels_agree_with_projection(rendered: tuple[Tensor, dict[str, Tensor]]) -> None:
    """The renderer and ``Cameras.project`` agree on where each visible marker is."""
    _, masks = rendered
    cams = INSTANT3D_2X2.cameras(radius=2.7, fov_deg=50.0)
    uv, _ = cams.project(torch.tensor([m.position for m in AXIS_MARKERS]), S)
    for tile in range(4):
        for j, marker in enumerate(AXIS_MARKERS):
            if EXPECTED[tile][marker.label] == "behind":
                continue
            u, v = _centroid(masks[marker.label][tile])
            assert abs(u - float(uv[tile, j, 0])) < 1.5, (tile, marker.label)
            assert abs(v - float(uv[tile, j, 1])) < 1.5, (tile, marker.label)


def test_azimuth0_turns_the_layout(rendered: tuple[Tensor, dict[str, Tensor]]) -> None:
    """With azimuth0 = 90, tile 0 shows what tile 1 shows at azimuth0 = 0."""
    views, _ = rendered
    turned, _ = render_axis_markers(view_size=S, azimuth0_deg=90.0)
    assert (turned[0] - views[1]).abs().max() < 1e-3
    assert (turned[2] - views[3]).abs().max() < 1e-3
