"""The generator: views + cameras -> triplane -> renders.

``LRMGenerator`` owns the three parts under the names the published
checkpoints use (``encoder``, ``transformer``, ``synthesizer``), so
``load_state_dict(strict=True)`` takes an InstantMesh NeRF state dict once its
``lrm_generator.`` prefix is removed (:mod:`.checkpoint` does that).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import LRMConfig
from .decoder import TriplaneTransformer
from .encoder import ImageEncoder
from .renderer import TriplaneRenderer


class LRMGenerator(nn.Module):
    """Sparse-view large reconstruction model with a triplane NeRF output."""

    def __init__(self, config: LRMConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ImageEncoder(config)
        self.transformer = TriplaneTransformer(config)
        self.synthesizer = TriplaneRenderer(config)

    def forward_planes(self, images: Tensor, cameras: Tensor) -> Tensor:
        """``images [B, V, 3, S, S]`` in ``[0, 1]`` (S = ``config.input_size``), ``cameras [B, V, 16]``.

        Returns the feature planes ``[B, 3, C, 2n, 2n]``.
        """
        return self.transformer(self.encoder(images, cameras))

    def render(
        self,
        planes: Tensor,
        c2w: Tensor,
        intrinsics: Tensor,
        size: int,
        *,
        samples_per_ray: int | None = None,
        chunk_rays: int = 1 << 13,
    ) -> tuple[Tensor, Tensor]:
        """Render ``planes`` at ``V`` shared cameras: ``rgb [B, V, 3, size, size]`` and opacity."""
        return self.synthesizer(planes, c2w, intrinsics, size, samples_per_ray=samples_per_ray, chunk_rays=chunk_rays)

    def forward(self, images: Tensor, cameras: Tensor, c2w: Tensor, intrinsics: Tensor, size: int) -> Tensor:
        """Reconstruct and render in one call (rgb only)."""
        return self.render(self.forward_planes(images, cameras), c2w, intrinsics, size)[0]


def build_generator(config: LRMConfig, *, device: str | torch.device = "cpu") -> LRMGenerator:
    """A generator with freshly initialised weights on ``device`` (``"meta"``: shapes only, no memory)."""
    with torch.device(device):
        return LRMGenerator(config)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
