"""The reconstructor interface every reconstruction model implements.

``reconstruct(views, cameras) -> scene`` builds a 3D representation from the
input views; ``render(scene, cameras, size) -> views`` renders it back. The
metric only ever calls these two methods, so a learned LRM and the weight-free
carving model are interchangeable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor

from ..cameras import Cameras


class Reconstructor(ABC):
    """A sparse-view reconstruction model.

    ``views`` are ``float32 [B, V, 3, S, S]`` in ``[0, 1]`` on a white
    background; renders use the same layout and value range.
    """

    #: Registry name (``--reconstructor``).
    name: str = ""

    @abstractmethod
    def reconstruct(self, views: Tensor, cameras: Cameras) -> Any:
        """Build one scene per grid from its views (batched)."""

    @abstractmethod
    def render(self, scene: Any, cameras: Cameras, size: int) -> Tensor:
        """Render every scene at ``cameras``: ``[B, V, 3, size, size]`` in ``[0, 1]``."""

    def fingerprint(self) -> str:
        """A short hash of the weights, '' for weight-free models (goes into the metric id)."""
        return ""

    def to(self, device: str) -> Reconstructor:
        return self
