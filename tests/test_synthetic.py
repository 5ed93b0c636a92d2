"""Procedural scenes and their renderer: determinism, framing, geometry, and controlled inconsistency."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from carve3d_reward.grid import join_grid, split_grid
from carve3d_reward.layouts import INSTANT3D_2X2
from carve3d_reward.tools.synthetic import (
    BOX,
    ELLIPSOID,
    INCONSISTENCY_KINDS,
    SceneBatch,
    inconsistent_views,
    make_grids,
    random_scenes,
    render_scenes,
)

RADIUS, FOV = 2.7, 50.0
CAMS = INSTANT3D_2X2.cameras(radius=RADIUS, fov_deg=FOV)
LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _scenes_equal(a: SceneBatch, b: SceneBatch) -> bool:
    return all(torch.equal(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))


def _single_primitives(
    kinds: list[int], scales: list[float], translations: list[tuple[float, float, float]]
) -> SceneBatch:
    """One primitive per scene, axis-aligned, dark colours (so 'min channel < 0.5' is a clean mask)."""
    n = len(kinds)
    return SceneBatch.from_placements(
        kind=torch.tensor(kinds)[:, None],
        rotation=torch.eye(3).expand(n, 1, 3, 3),
        scale=torch.tensor(scales)[:, None, None].expand(n, 1, 3),
        translation=torch.tensor(translations)[:, None],
        colour_a=torch.tensor([0.8, 0.1, 0.1]).expand(n, 1, 3),
        colour_b=torch.tensor([0.1, 0.1, 0.8]).expand(n, 1, 3),
        texture=torch.zeros(n, 1, dtype=torch.long),
        frequency=torch.full((n, 1), 2.0),
    )


def _mask(views: torch.Tensor) -> torch.Tensor:
    """Foreground mask ``[B, V, S, S]`` of renders of the dark test primitives (half coverage or more)."""
    return views.amin(dim=2) < 0.5


@pytest.fixture(scope="module")
def scenes16() -> SceneBatch:
    return random_scenes(16, seed=7)


@pytest.fixture(scope="module")
def scenes8() -> SceneBatch:
    return random_scenes(8, seed=11)


def test_random_scenes_deterministic_and_prefix_stable() -> None:
    a, b, c = random_scenes(5, seed=3), random_scenes(5, seed=3), random_scenes(5, seed=4)
    assert _scenes_equal(a, b)
    assert not torch.equal(a.world_to_local, c.world_to_local)
    assert _scenes_equal(random_scenes(2, seed=3), a[:2])  # scene i depends on (seed, i) only
    assert a.active[:, 0].all() and a.active.shape == (5, 4)
    ra, rb, rc = (render_scenes(s, CAMS, 32) for s in (a, b, c))
    assert torch.equal(ra, rb)
    assert not torch.equal(ra, rc)


def test_random_views_white_background_framed_and_non_empty(scenes16: SceneBatch) -> None:
    views = render_scenes(scenes16, CAMS, 64)
    assert views.shape == (16, 4, 3, 64, 64)
    assert views.min() >= 0.0 and views.max() <= 1.0
    corners = views[..., [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 1.0).all()
    border = torch.cat([views[..., 0, :], views[..., -1, :], views[..., :, 0], views[..., :, -1]], dim=-1)
    assert (border == 1.0).all(), "an object is cut by the image border"
    foreground = (views < 0.95).any(dim=2)  # [B, V, S, S]
    assert foreground.flatten(2).any(dim=2).all(), "a view has no foreground"
    assert foreground.flatten(2).float().mean() > 0.03


def test_foreground_pixels_are_never_near_white(scenes16: SceneBatch) -> None:
    # Without antialiasing every pixel is either background (exactly white) or a primitive hit.
    views = render_scenes(scenes16, CAMS, 32, supersample=1)
    white = (views == 1.0).all(dim=2)
    assert ((views.amin(dim=2) < 0.95) | white).all()


def test_sphere_disc_radius_matches_pinhole_projection() -> None:
    size, radii = 64, [0.4, 0.6, 0.8]
    views = render_scenes(_single_primitives([ELLIPSOID] * 3, radii, [(0.0, 0.0, 0.0)] * 3), CAMS, size)
    mask = _mask(views)
    f = CAMS.focal_px(size)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    for i, r in enumerate(radii):
        expected = f * r / math.sqrt(RADIUS**2 - r**2)
        for v in range(len(CAMS)):
            m = mask[i, v]
            measured = math.sqrt(m.sum().item() / math.pi)
            assert abs(measured - expected) < 1.0, (r, v, measured, expected)
            # centred: the disc's centroid is the principal point
            assert abs(xs[m].mean().item() - size / 2) < 0.5 and abs(ys[m].mean().item() - size / 2) < 0.5


def test_primitive_centres_project_onto_their_blobs() -> None:
    size = 64
    centres = [(0.45, -0.3, 0.25), (-0.2, 0.5, -0.35), (0.3, 0.4, 0.5)]
    scenes = _single_primitives([ELLIPSOID, BOX, ELLIPSOID], [0.15, 0.12, 0.1], centres)
    assert torch.allclose(scenes.centres[:, 0], torch.tensor(centres), atol=1e-5)
    views = render_scenes(scenes, CAMS, size)
    mask = _mask(views)
    uv, depth = CAMS.project(torch.tensor(centres)[:, None, :], size)  # [3, V, 1, 2]
    assert (depth > 0).all()
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    for i in range(len(centres)):
        for v in range(len(CAMS)):
            m = mask[i, v]
            assert m.sum() > 10
            blob = torch.stack([xs[m].mean(), ys[m].mean()])
            assert torch.dist(blob, uv[i, v, 0]).item() < 1.0, (i, v, blob, uv[i, v, 0])


def test_make_grids_joins_rendered_views() -> None:
    grids = make_grids(3, seed=5, view_size=32)
    assert grids.shape == (3, 3, 64, 64)
    assert torch.equal(split_grid(grids, INSTANT3D_2X2), render_scenes(random_scenes(3, 5), CAMS, 32))
    assert torch.equal(join_grid(split_grid(grids, INSTANT3D_2X2), INSTANT3D_2X2), grids)


@pytest.mark.parametrize("kind", INCONSISTENCY_KINDS)
def test_inconsistency_level_zero_is_clean_and_only_one_view_changes(kind: str, scenes8: SceneBatch) -> None:
    clean = render_scenes(scenes8, CAMS, 48)
    assert torch.equal(inconsistent_views(scenes8, CAMS, 48, kind, 0.0, view=2, seed=1), clean)
    broken = inconsistent_views(scenes8, CAMS, 48, kind, 0.75, view=2, seed=1)
    others = [0, 1, 3]
    assert torch.equal(broken[:, others], clean[:, others])
    changed = (broken[:, 2] - clean[:, 2]).abs().flatten(1).amax(dim=1)
    assert (changed > 0.05).all(), changed
    assert broken.min() >= 0.0 and broken.max() <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("kind", INCONSISTENCY_KINDS)
def test_inconsistency_grows_monotonically_with_level(kind: str, scenes8: SceneBatch) -> None:
    clean = render_scenes(scenes8, CAMS, 48)[:, 1]
    diffs = torch.stack(
        [(inconsistent_views(scenes8, CAMS, 48, kind, lv)[:, 1] - clean).abs().mean(dim=(1, 2, 3)) for lv in LEVELS]
    )  # [levels, B]
    batch_mean = diffs.mean(dim=1)
    assert batch_mean[0] == 0.0
    assert (batch_mean[1:] > batch_mean[:-1]).all(), batch_mean
    if kind == "patch":  # nested squares: never decreases for any scene
        assert (diffs[1:] >= diffs[:-1]).all()


def test_colour_inconsistency_keeps_background_white(scenes8: SceneBatch) -> None:
    clean = render_scenes(scenes8, CAMS, 48)[:, 1]
    shifted = inconsistent_views(scenes8, CAMS, 48, "colour", 1.0)[:, 1]
    white = (clean == 1.0).all(dim=1, keepdim=True).expand_as(clean)
    assert (shifted[white] == 1.0).all()


def test_pose_inconsistency_is_a_wrong_camera_azimuth(scenes8: SceneBatch) -> None:
    rotated = inconsistent_views(scenes8, CAMS, 48, "pose", 1.0, view=1)[:, 1]
    wrong_cams = INSTANT3D_2X2.cameras(radius=RADIUS, fov_deg=FOV, azimuth0_deg=-60.0)
    expected = render_scenes(scenes8, wrong_cams, 48)[:, 1]
    # rotating the object (and its lights) by +60 deg == looking from an azimuth 60 deg too small
    assert (rotated - expected).abs().mean() < 1e-4
    assert (rotated - expected).abs().max() < 0.05


@pytest.mark.parametrize("kind", INCONSISTENCY_KINDS)
def test_batch_equals_per_scene(kind: str) -> None:
    scenes = random_scenes(4, seed=21)
    levels = torch.tensor([0.2, 0.5, 0.0, 1.0])
    batch = inconsistent_views(scenes, CAMS, 32, kind, levels, view=3, seed=9)
    for i in range(len(scenes)):
        single = inconsistent_views(scenes[i], CAMS, 32, kind, float(levels[i]), view=3, seed=9)
        assert torch.equal(batch[i : i + 1], single), (kind, i)
    rendered = render_scenes(scenes, CAMS, 32)
    for i in range(len(scenes)):
        assert torch.equal(rendered[i : i + 1], render_scenes(scenes[i], CAMS, 32))


def test_bad_arguments_raise(scenes8: SceneBatch) -> None:
    with pytest.raises(ValueError, match="patch, pose, colour"):
        inconsistent_views(scenes8, CAMS, 32, "blur", 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        inconsistent_views(scenes8, CAMS, 32, "pose", 1.5)
    with pytest.raises(ValueError, match="out of range"):
        inconsistent_views(scenes8, CAMS, 32, "pose", 0.5, view=4)
