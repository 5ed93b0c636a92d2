"""The MRC metric end to end: zero for a perfect reconstruction, ordering, batching, flags, ids."""

import pytest
import torch

from carve3d_reward.cameras import Cameras
from carve3d_reward.grid import join_grid
from carve3d_reward.layouts import INSTANT3D_2X2, LAYOUTS, GridLayout
from carve3d_reward.metric import MRC
from carve3d_reward.reconstructors import Reconstructor
from carve3d_reward.scores import GridScore, Status
from carve3d_reward.settings import MetricSettings
from carve3d_reward.tools.synthetic import random_scenes, render_scenes

from .conftest import VIEW


class EchoReconstructor(Reconstructor):
    """A perfect reconstruction: renders are the inputs themselves."""

    name = "echo"

    def reconstruct(self, views: torch.Tensor, cameras: Cameras) -> torch.Tensor:
        return views

    def render(self, scene: torch.Tensor, cameras: Cameras, size: int) -> torch.Tensor:
        return scene


@pytest.mark.parametrize("distance", ["l1", "ssim"])
def test_identical_render_scores_zero(fast_settings, clean_views, distance) -> None:
    metric = MRC(fast_settings.model_copy(update={"distance": distance}), reconstructor=EchoReconstructor())
    result = metric.score_views(clean_views)
    torch.testing.assert_close(result.mrc, torch.zeros(len(clean_views)), atol=1e-6, rtol=0)
    assert result.valid.all()


@pytest.mark.slow
def test_consistent_grid_scores_lower_than_one_with_a_view_replaced(metric, clean_views, cameras) -> None:
    others = render_scenes(random_scenes(len(clean_views), seed=99), cameras, VIEW)
    broken = clean_views.clone()
    broken[:, 2] = others[:, 2]
    good, bad = metric.score_views(clean_views), metric.score_views(broken)
    assert (good.mrc < bad.mrc).all(), (good.mrc, bad.mrc)
    assert (bad.reward < good.reward).all()


def test_grids_and_views_give_the_same_scores(metric, clean_views) -> None:
    grids = join_grid(clean_views, INSTANT3D_2X2)
    assert grids.shape == (len(clean_views), 3, 2 * VIEW, 2 * VIEW)
    torch.testing.assert_close(metric(grids).mrc, metric.score_views(clean_views).mrc, rtol=0, atol=0)


@pytest.mark.slow
def test_batch_equals_per_sample_and_is_deterministic(metric, clean_views) -> None:
    batched = metric.score_views(clean_views)
    singles = torch.cat([metric.score_views(clean_views[i : i + 1]).mrc for i in range(len(clean_views))])
    torch.testing.assert_close(batched.mrc, singles, atol=1e-6, rtol=1e-5)
    again = metric.score_views(clean_views)
    assert torch.equal(batched.mrc, again.mrc) and torch.equal(batched.distances, again.distances)


def test_empty_view_gets_the_worst_distance_and_a_status(metric, clean_views) -> None:
    views = clean_views[:2].clone()
    views[1, 3] = 1.0  # grid 1, view 3: nothing but white background
    result = metric.score_views(views)
    assert result.empty.tolist() == [[False] * 4, [False, False, False, True]]
    assert result.distances[1, 3] == metric.distance.worst
    assert result.valid.tolist() == [True, False]
    scores = result.scores()
    assert scores[0].status is Status.OK and scores[1].status is Status.EMPTY_VIEW
    assert result.mrc[1] > 0.25  # never a silent 0: the empty view dominates the score
    d = scores[1].to_wire()
    assert d["status"] == "empty_view" and d["views"][3]["empty"] is True
    assert d["reward"] == -d["mrc"] and d["metric"] == metric.metric_id and d["version"]
    assert len(d["views"][0]["bbox"]) == 4
    assert GridScore.from_wire(d) == scores[1]  # the wire round-trips


def test_an_unscored_grid_is_never_a_silent_zero(metric) -> None:
    bad = GridScore.invalid("views must be square", metric.metric_id)
    wire = bad.to_wire()
    assert wire["mrc"] is None and wire["reward"] is None and wire["status"] == "invalid" and wire["views"] == []
    assert wire["error"] == "views must be square" and wire["version"] and wire["metric"] == metric.metric_id
    assert not bad.ok and GridScore.from_wire(wire) == bad
    with pytest.raises(ValueError):
        GridScore.from_wire({"status": "fine"})  # not a status


def test_views_are_resampled_to_the_working_size(fast_settings, clean_views) -> None:
    metric = MRC(fast_settings.model_copy(update={"view_size": 32}))
    result = metric.score_views(clean_views[:1], return_renders=True)
    assert result.renders is not None and result.renders.shape == (1, 4, 3, 32, 32)
    assert result.views is not None and result.views.shape == (1, 4, 3, 32, 32)
    native = MRC(fast_settings.model_copy(update={"view_size": None}))
    assert native.score_views(clean_views[:1], return_renders=True).renders.shape[-1] == VIEW


def test_metric_id_changes_with_scoring_settings_only(fast_settings) -> None:
    base = MRC(fast_settings).metric_id
    assert base.startswith("mrc/carve+l1/v")
    assert MRC(fast_settings.model_copy(update={"distance": "ssim"})).metric_id != base
    assert MRC(fast_settings.model_copy(update={"fov_deg": 40.0})).metric_id != base
    assert MRC(fast_settings.model_copy(update={"carve_resolution": 32})).metric_id != base
    assert MRC(fast_settings.model_copy(update={"chunk_rays": 4096})).metric_id == base


def test_settings_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("MRC_DISTANCE", "ssim")
    monkeypatch.setenv("MRC_VIEW_SIZE", "48")
    s = MetricSettings()
    assert s.distance == "ssim" and s.view_size == 48
    assert MetricSettings(distance="l1").distance == "l1"  # explicit values win


@pytest.mark.slow
def test_other_layouts_work_without_touching_the_metric(monkeypatch, fast_settings) -> None:
    six = GridLayout("3x2-test", 2, 3, (30.0, 90.0, 150.0, 210.0, 270.0, 330.0), (20.0, -10.0) * 3)
    monkeypatch.setitem(LAYOUTS, six.name, six)
    metric = MRC(fast_settings.model_copy(update={"layout": six.name}))
    cams = six.cameras(radius=2.7, fov_deg=50.0)
    views = render_scenes(random_scenes(2, seed=1), cams, VIEW)
    grids = join_grid(views, six)
    assert grids.shape == (2, 3, 2 * VIEW, 3 * VIEW)
    result = metric(grids)
    assert result.distances.shape == (2, 6) and result.valid.all()
    assert (result.mrc < 0.05).all()


def test_lrm_without_weights_says_how_to_get_them(tmp_path) -> None:
    from carve3d_reward.errors import WeightsMissingError

    with pytest.raises(WeightsMissingError, match="mrc weights fetch --lrm"):
        MRC(MetricSettings(reconstructor="lrm", lrm_cache_dir=tmp_path))
