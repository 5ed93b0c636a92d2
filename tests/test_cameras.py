"""The camera convention, pinned: centres, look-at, image right and up."""

import math

import pytest
import torch

from carve3d_reward.cameras import Cameras, look_at_c2w, orbit_positions
from carve3d_reward.errors import ConfigError
from carve3d_reward.layouts import INSTANT3D_2X2, GridLayout, get_layout

R, FOV, S = 2.7, 50.0, 64


@pytest.fixture()
def cams() -> Cameras:
    return INSTANT3D_2X2.cameras(radius=R, fov_deg=FOV)


def test_centres_follow_elevation_and_azimuth(cams: Cameras) -> None:
    el = math.radians(20)
    expected = torch.tensor(
        [
            [R * math.cos(el), 0.0, R * math.sin(el)],
            [0.0, R * math.cos(el), R * math.sin(el)],
            [-R * math.cos(el), 0.0, R * math.sin(el)],
            [0.0, -R * math.cos(el), R * math.sin(el)],
        ]
    )
    torch.testing.assert_close(cams.centers, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(cams.centers.norm(dim=-1), torch.full((4,), R), atol=1e-5, rtol=0)


def test_azimuth0_rotates_every_camera() -> None:
    base = INSTANT3D_2X2.cameras(radius=R, fov_deg=FOV)
    turned = INSTANT3D_2X2.cameras(radius=R, fov_deg=FOV, azimuth0_deg=90.0)
    torch.testing.assert_close(turned.centers[:3], base.centers[1:], atol=1e-5, rtol=0)


def test_cameras_look_at_the_origin(cams: Cameras) -> None:
    uv, depth = cams.project(torch.zeros(1, 3), S)
    torch.testing.assert_close(uv[:, 0], torch.full((4, 2), S / 2), atol=1e-4, rtol=0)
    torch.testing.assert_close(depth[:, 0], torch.full((4,), R), atol=1e-5, rtol=0)
    # OpenGL: the camera looks along its -z axis, so -z points from the centre to the origin.
    torch.testing.assert_close(-cams.c2w[:, :3, 2], -cams.centers / R, atol=1e-6, rtol=0)
    # Rotation part is orthonormal and right-handed.
    rot = cams.c2w[:, :3, :3]
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3).expand(4, 3, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(4), atol=1e-6, rtol=0)


def test_world_up_is_image_up(cams: Cameras) -> None:
    uv, _ = cams.project(torch.tensor([[0.0, 0.0, 0.5]]), S)
    assert (uv[:, 0, 1] < S / 2 - 1).all()  # v grows downwards
    torch.testing.assert_close(uv[:, 0, 0], torch.full((4,), S / 2), atol=1e-4, rtol=0)


def test_next_tile_camera_is_on_image_right(cams: Cameras) -> None:
    """Instant3D layout: tile k+1's camera sits on the image-right side of tile k."""
    for k in range(4):
        nxt = cams.centers[(k + 1) % 4]
        towards_next = 0.5 * torch.nn.functional.normalize(nxt * torch.tensor([1.0, 1.0, 0.0]), dim=0)
        uv, _ = cams.project(towards_next[None], S)
        assert uv[k, 0, 0] > S / 2 + 1, f"tile {k}: the next camera is not to the image right"
        prev = cams.centers[(k - 1) % 4]
        towards_prev = 0.5 * torch.nn.functional.normalize(prev * torch.tensor([1.0, 1.0, 0.0]), dim=0)
        uv, _ = cams.project(towards_prev[None], S)
        assert uv[k, 0, 0] < S / 2 - 1


def test_focal_matches_fov(cams: Cameras) -> None:
    f = cams.focal_px(S)
    assert f == pytest.approx(S / 2 / math.tan(math.radians(FOV / 2)))
    # A point at the edge of the field of view lands on the image border.
    half = math.tan(math.radians(FOV / 2))
    p = cams.c2w[0, :3, 3] + (cams.c2w[0, :3, :3] @ torch.tensor([half, 0.0, -1.0]))
    uv, _ = cams.project(p[None], S)
    assert uv[0, 0, 0].item() == pytest.approx(S, abs=1e-3)
    intr = cams.intrinsics_normalized()
    torch.testing.assert_close(intr[0], torch.tensor([f / S, f / S, 0.5, 0.5]))


def test_rays_round_trip_through_projection(cams: Cameras) -> None:
    origins, dirs = cams.rays(S)
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(4, S, S), atol=1e-5, rtol=0)
    torch.testing.assert_close(origins[:, 0, 0], cams.centers)
    pts = origins + 1.7 * dirs  # [V, S, S, 3]
    for k in range(4):
        uv, depth = cams.project(pts[k].reshape(-1, 3), S)
        centres = torch.stack(
            torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="xy"), dim=-1
        ).reshape(-1, 2)
        torch.testing.assert_close(uv[k], centres, atol=1e-3, rtol=0)
        assert (depth[k] > 0).all()


def test_look_at_and_orbit_helpers() -> None:
    eye = orbit_positions(torch.tensor([45.0]), torch.tensor([0.0]), 2.0)
    torch.testing.assert_close(eye, torch.tensor([[math.sqrt(2), math.sqrt(2), 0.0]], dtype=torch.float64))
    c2w = look_at_c2w(eye)
    torch.testing.assert_close(c2w[0, :3, 1], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6, rtol=0)  # camera up = world up


def test_layouts_are_data() -> None:
    assert get_layout("2x2") is INSTANT3D_2X2
    with pytest.raises(ConfigError, match="unknown grid layout"):
        get_layout("5x5")
    with pytest.raises(ConfigError, match="need 6 azimuths"):
        GridLayout("3x2", 2, 3, (0.0,), (20.0,))
    six = GridLayout("3x2", 2, 3, (30.0, 90.0, 150.0, 210.0, 270.0, 330.0), (20.0, -10.0) * 3)
    assert len(six.cameras(radius=R, fov_deg=30.0)) == 6
