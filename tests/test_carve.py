"""The weight-free carving reconstructor: hull geometry, holdout colours, batching."""

import math

import torch

from carve3d_reward.reconstructors.carve import CarveConfig, CarveReconstructor
from carve3d_reward.tools.synthetic import SceneBatch, render_scenes

S = 64


def sphere_scene(radius: float = 0.6) -> SceneBatch:
    one = torch.ones(1, 1)
    return SceneBatch.from_placements(
        kind=torch.zeros(1, 1),
        rotation=torch.eye(3).expand(1, 1, 3, 3),
        scale=torch.full((1, 1, 3), radius),
        translation=torch.zeros(1, 1, 3),
        colour_a=torch.tensor([[[0.8, 0.2, 0.2]]]),
        colour_b=torch.tensor([[[0.2, 0.3, 0.8]]]),
        texture=torch.zeros(1, 1),
        frequency=2.0 * one,
    )


def silhouette(views: torch.Tensor) -> torch.Tensor:
    return (views < 0.95).any(dim=-3)


def test_hull_of_a_sphere_has_about_its_volume(cameras) -> None:
    views = render_scenes(sphere_scene(0.6), cameras, S)
    recon = CarveReconstructor(CarveConfig(resolution=64))
    scene = recon.reconstruct(views, cameras)
    voxel = (2.0 / 64) ** 3
    volume = (scene.occupancy >= 0.5).sum().item() * voxel
    sphere = 4 / 3 * math.pi * 0.6**3
    # A 4-view visual hull contains the sphere and is not much bigger than it.
    assert sphere * 0.95 < volume < sphere * 1.35
    # The hull is centred at the origin.
    occ = (scene.occupancy[0, 0] >= 0.5).float()
    idx = torch.nonzero(occ).float().mean(dim=0)
    torch.testing.assert_close(idx, torch.full((3,), 31.5), atol=0.6, rtol=0)


def test_consistent_views_are_re_rendered_closely(cameras, clean_views) -> None:
    recon = CarveReconstructor()
    renders = recon.render(recon.reconstruct(clean_views, cameras), cameras, S)
    assert renders.shape == clean_views.shape
    assert renders.min() >= 0 and renders.max() <= 1
    # Silhouettes agree (IoU) and colours are close.
    a, b = silhouette(clean_views), silhouette(renders)
    iou = (a & b).sum(dim=(-1, -2)).float() / (a | b).sum(dim=(-1, -2)).float()
    assert iou.min() > 0.85, iou
    assert (renders - clean_views).abs().mean() < 0.03


def test_recolouring_one_view_raises_its_distance_and_its_neighbours(cameras, clean_views) -> None:
    """Holdout colour: a view that disagrees in colour is re-rendered partly from the others' colours,
    and the others inherit part of its disagreement."""
    from carve3d_reward.metric import MRC
    from carve3d_reward.settings import MetricSettings

    recoloured = clean_views.clone()
    fg = silhouette(clean_views[:, 1])[:, None]
    recoloured[:, 1] = torch.where(fg, torch.tensor([0.1, 0.8, 0.1])[:, None, None], clean_views[:, 1])
    metric = MRC(MetricSettings(view_size=S))
    clean = metric.score_views(clean_views)
    broken = metric.score_views(recoloured)
    assert (broken.mrc > clean.mrc).all(), (clean.mrc, broken.mrc)
    assert (broken.mrc / clean.mrc).mean() > 1.2
    neighbours = broken.distances[:, [0, 2]].mean() - clean.distances[:, [0, 2]].mean()
    assert neighbours > 0.1 * clean.distances[:, [0, 2]].mean()


def test_wrong_silhouette_carves_the_hull(cameras) -> None:
    views = render_scenes(sphere_scene(0.6), cameras, S)
    shifted = views.clone()
    shifted[:, 1] = torch.roll(views[:, 1], shifts=12, dims=-1).clone()
    shifted[:, 1, :, :, :12] = 1.0
    recon = CarveReconstructor()
    full = (recon.reconstruct(views, cameras).occupancy >= 0.5).sum()
    carved = (recon.reconstruct(shifted, cameras).occupancy >= 0.5).sum()
    assert carved < 0.8 * full


def test_batch_equals_single_and_chunking_does_not_matter(cameras, clean_views) -> None:
    recon = CarveReconstructor()
    batched = recon.render(recon.reconstruct(clean_views[:3], cameras), cameras, S)
    singles = torch.cat(
        [recon.render(recon.reconstruct(clean_views[i : i + 1], cameras), cameras, S) for i in range(3)]
    )
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=0)
    small = CarveReconstructor(CarveConfig(chunk_rays=4096))
    chunked = small.render(small.reconstruct(clean_views[:3], cameras), cameras, S)
    torch.testing.assert_close(batched, chunked, atol=1e-5, rtol=0)


def test_render_at_new_cameras_and_sizes(cameras, clean_views) -> None:
    """Rendering is not tied to the input cameras: other sizes and poses march the hull again."""
    recon = CarveReconstructor()
    scene = recon.reconstruct(clean_views[:2], cameras)
    bigger = recon.render(scene, cameras, 96)
    assert bigger.shape == (2, 4, 3, 96, 96)
    assert silhouette(bigger).float().mean() > 0.02
    from carve3d_reward.layouts import INSTANT3D_2X2

    turned = INSTANT3D_2X2.cameras(radius=2.7, fov_deg=50.0, azimuth0_deg=45.0)
    novel = recon.render(scene, turned, S)
    assert silhouette(novel).float().mean() > 0.02


def test_fingerprint_tracks_parameters() -> None:
    a = CarveReconstructor().fingerprint()
    assert a == CarveReconstructor(CarveConfig(chunk_rays=1024)).fingerprint()
    assert a != CarveReconstructor(CarveConfig(resolution=32)).fingerprint()
