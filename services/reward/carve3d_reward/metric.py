"""The MRC metric: grids in, scores out, batched end to end.

``grids -> views -> reconstruct -> render -> crop (box from the input view)
-> distance -> mean over views``. Every score comes with its per-view
distances, boxes, empty-foreground flags, a status and the metric id, so a
score is never mixed with one computed under other settings and an empty view
is never a silent 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .bbox import crop_resize, foreground_boxes
from .cameras import Cameras
from .distances import Distance, build_distance
from .errors import ConfigError
from .grid import resize_views, split_grid
from .layouts import GridLayout, get_layout
from .reconstructors import Reconstructor, build_reconstructor
from .scores import GridScore, batch_scores
from .settings import MetricSettings


@dataclass
class MRCResult:
    """Batched result: tensors with the batch as the first dimension."""

    mrc: Tensor  # [B]
    distances: Tensor  # [B, V]
    boxes: Tensor  # [B, V, 4] int64
    empty: Tensor  # [B, V] bool
    metric_id: str
    views: Tensor | None = field(default=None, repr=False)  # [B, V, 3, S, S] working-resolution inputs
    renders: Tensor | None = field(default=None, repr=False)  # [B, V, 3, S, S]

    @property
    def reward(self) -> Tensor:
        return -self.mrc

    @property
    def valid(self) -> Tensor:
        """``[B]`` True where no view was empty (the grids to keep in statistics)."""
        return ~self.empty.any(dim=1)

    def __len__(self) -> int:
        return int(self.mrc.shape[0])

    def scores(self) -> list[GridScore]:
        """One :class:`~carve3d_reward.scores.GridScore` per grid (the metric's only conversion to scores)."""
        return batch_scores(self.mrc, self.distances, self.boxes, self.empty, self.metric_id)


class MRC:
    """The Multi-view Reconstruction Consistency metric (lower is more consistent).

    >>> metric = MRC(MetricSettings(view_size=64))
    >>> result = metric(grids)          # grids: float [B, 3, H, W] in [0, 1]
    >>> result.mrc, result.reward, result.empty
    """

    def __init__(
        self,
        settings: MetricSettings | None = None,
        *,
        reconstructor: Reconstructor | None = None,
        distance: Distance | None = None,
    ) -> None:
        self.settings = settings or MetricSettings()
        s = self.settings
        self.device = torch.device(s.device)
        self.layout: GridLayout = get_layout(s.layout)
        self.cameras: Cameras = self.layout.cameras(radius=s.radius, fov_deg=s.fov_deg, azimuth0_deg=s.azimuth0_deg)
        self.reconstructor = reconstructor or build_reconstructor(s)
        self.distance = distance or build_distance(
            s.distance, device=s.device, trunk_path=s.lpips_trunk_path, trunk_sha256=s.lpips_trunk_sha256
        )
        size = s.view_size
        if size is not None and size < self.distance.min_size:
            raise ConfigError(
                f"--view-size {size} is too small for {self.distance.name} (needs at least {self.distance.min_size} px)"
            )
        fingerprints = (self.reconstructor.fingerprint(), self.distance.fingerprint)
        self.metric_id = s.metric_id("-".join(f for f in fingerprints if f))

    @torch.inference_mode()
    def __call__(self, grids: Tensor, *, return_renders: bool = False) -> MRCResult:
        """Score grids ``float32 [B, 3, H, W]`` in ``[0, 1]`` (see :func:`grid.to_grid_tensor`)."""
        views = split_grid(grids.to(self.device, torch.float32), self.layout)
        return self.score_views(views, return_renders=return_renders)

    @torch.inference_mode()
    def score_views(self, views: Tensor, *, return_renders: bool = False) -> MRCResult:
        """Score views ``[B, V, 3, h, w]`` already split from their grids."""
        views = self.resize_views(views.to(self.device, torch.float32))
        return self.compare(views, self.rerender(views), return_renders=return_renders)

    @torch.inference_mode()
    def rerender(self, views: Tensor) -> Tensor:
        """Reconstruct from working-resolution views and render at the same cameras."""
        scene = self.reconstructor.reconstruct(views, self.cameras)
        return self.reconstructor.render(scene, self.cameras, views.shape[-1])

    @torch.inference_mode()
    def compare(self, views: Tensor, renders: Tensor, *, return_renders: bool = False) -> MRCResult:
        """Box-normalised distances between views and their re-renders (both ``[B, V, 3, S, S]``)."""
        b, v, c, size, _ = views.shape
        flat_views = views.reshape(b * v, c, size, size)
        boxes, empty = foreground_boxes(flat_views, self.settings.fg_threshold, self.settings.bbox_pad)
        crops_in = crop_resize(flat_views, boxes, size)
        crops_out = crop_resize(renders.reshape(b * v, c, size, size), boxes, size)
        dist = self.distance(crops_in, crops_out).to(torch.float32)
        dist = torch.where(empty, torch.full_like(dist, self.distance.worst), dist).reshape(b, v)
        return MRCResult(
            mrc=dist.mean(dim=1).cpu(),
            distances=dist.cpu(),
            boxes=boxes.reshape(b, v, 4).cpu(),
            empty=empty.reshape(b, v).cpu(),
            metric_id=self.metric_id,
            views=views.cpu() if return_renders else None,
            renders=renders.cpu() if return_renders else None,
        )

    def resize_views(self, views: Tensor) -> Tensor:
        """Resample views to the working resolution (a no-op for grids from :func:`grid.decode_grid`)."""
        size = self.settings.view_size
        return views if size is None else resize_views(views, size)
