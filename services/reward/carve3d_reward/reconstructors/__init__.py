"""Reconstruction models behind one interface (:class:`Reconstructor`)."""

from __future__ import annotations

from ..errors import ConfigError
from ..settings import MetricSettings
from .base import Reconstructor


def build_reconstructor(settings: MetricSettings) -> Reconstructor:
    """The reconstructor named by ``settings.reconstructor``."""
    if settings.reconstructor == "carve":
        from .carve import CarveConfig, CarveReconstructor

        config = CarveConfig(
            resolution=settings.carve_resolution,
            samples_per_ray=settings.carve_samples,
            fg_threshold=settings.fg_threshold,
            chunk_rays=settings.chunk_rays,
        )
        return CarveReconstructor(config).to(settings.device)
    if settings.reconstructor == "lrm":
        from ..lrm.reconstructor import LRMReconstructor

        return LRMReconstructor.from_settings(settings)  # WeightsMissingError says how to get the weights
    raise ConfigError(f"unknown reconstructor {settings.reconstructor!r}")


__all__ = ["Reconstructor", "build_reconstructor"]
