"""The MRC metric: grids in, scores out, batched end to end.

``grids -> views -> reconstruct -> render -> crop (box from the input view)
-> distance -> mean over views``. Every score comes with its per-view
distances, boxes, empty-foreground flags, a status and the metric id, so a
score is never mixed with one computed under other settings and an empty view
is never a silent 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import __version__
from .bbox import crop_resize, foreground_boxes
from .cameras import Cameras
from .distances import Distance, build_distance
from .errors import ConfigError
from .grid import resize_views, split_grid
from .layouts import GridLayout, get_layout
from .reconstructors import Reconstructor, build_reconstructor
from .settings import MetricSettings

STATUS_OK = "ok"
STATUS_EMPTY_VIEW = "empty_view"


@dataclass
class ViewScore:
    """One view's part of a score."""

    distance: float
    bbox: tuple[int, int, int, int]  # (x_min, y_min, x_max, y_max), inclusive, working-resolution pixels
    empty: bool


@dataclass
class GridScore:
    """The score of one grid, JSON-ready (see ``proto/mrc.proto``)."""

    mrc: float
    reward: float
    status: str
    views: list[ViewScore]
    metric: str
    version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return {
            "mrc": self.mrc,
            "reward": self.reward,
            "status": self.status,
            "views": [vars(v) | {"bbox": list(v.bbox)} for v in self.views],
            "metric": self.metric,
            "version": self.version,
        }


def grid_score(
    mrc: float, distances: list[float], boxes: list[list[int]], empty: list[bool], metric_id: str
) -> GridScore:
    """One grid's score from plain values: the only place a ``GridScore`` and its status are made."""
    views = [
        ViewScore(float(d), (int(b[0]), int(b[1]), int(b[2]), int(b[3])), bool(e))
        for d, b, e in zip(distances, boxes, empty, strict=True)
    ]
    status = STATUS_EMPTY_VIEW if any(empty) else STATUS_OK
    return GridScore(mrc=float(mrc), reward=-float(mrc), status=status, views=views, metric=metric_id)


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

    def status(self, i: int) -> str:
        return self.grid(i).status

    def grid(self, i: int) -> GridScore:
        """The ``i``-th grid's score as a plain object."""
        return grid_score(
            float(self.mrc[i]), self.distances[i].tolist(), self.boxes[i].tolist(), self.empty[i].tolist(),
            self.metric_id,
        )  # fmt: skip

    def grids(self) -> list[GridScore]:
        return [self.grid(i) for i in range(len(self))]


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
