"""Shared fixtures: small synthetic grids and a fast metric (64 px views)."""

import pytest
import torch

from carve3d_reward.layouts import INSTANT3D_2X2
from carve3d_reward.metric import MRC
from carve3d_reward.settings import MetricSettings
from carve3d_reward.tools.synthetic import SceneBatch, random_scenes, render_scenes

VIEW = 64


@pytest.fixture(scope="session")
def cameras():
    return INSTANT3D_2X2.cameras(radius=2.7, fov_deg=50.0)


@pytest.fixture(scope="session")
def scenes() -> SceneBatch:
    return random_scenes(6, seed=7)


@pytest.fixture(scope="session")
def clean_views(scenes, cameras) -> torch.Tensor:
    """Perfectly consistent views ``[6, 4, 3, 64, 64]``."""
    return render_scenes(scenes, cameras, VIEW)


@pytest.fixture(scope="session")
def fast_settings() -> MetricSettings:
    return MetricSettings(view_size=VIEW, carve_resolution=48, carve_samples=96)


@pytest.fixture(scope="session")
def metric(fast_settings) -> MRC:
    return MRC(fast_settings)
