"""Diffusion policies behind one interface (:class:`DiffusionPolicy`)."""

from .base import Conditioning, DiffusionPolicy, SamplingConfig, Trajectory

__all__ = ["Conditioning", "DiffusionPolicy", "SamplingConfig", "Trajectory"]
