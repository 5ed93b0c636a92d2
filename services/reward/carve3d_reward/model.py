"""The one model callable every engine serves (in-process batcher, Triton).

``uint8 grids [B, H, W, 3] in -> mrc, per-view distances, boxes, empty flags
out``, as plain arrays, so the engines cannot drift apart: they differ only in
how they gather a batch, never in what they compute on it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .grid import to_grid_tensor, to_uint8_image
from .metric import MRC, MRCResult
from .scores import GridScore, batch_scores
from .settings import MetricSettings

#: Output tensor names (also the Triton model's outputs; see docs/api.md).
OUTPUTS = ("mrc", "distances", "boxes", "empty")


@dataclass
class ModelOutputs:
    """Batched outputs as numpy arrays, first dimension the batch."""

    mrc: np.ndarray  # [B] float32
    distances: np.ndarray  # [B, V] float32
    boxes: np.ndarray  # [B, V, 4] int32
    empty: np.ndarray  # [B, V] bool

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in OUTPUTS}

    @staticmethod
    def from_result(result: MRCResult) -> ModelOutputs:
        """A library result as the model callable's outputs."""
        return ModelOutputs(
            mrc=result.mrc.cpu().numpy().astype(np.float32),
            distances=result.distances.cpu().numpy().astype(np.float32),
            boxes=result.boxes.cpu().numpy().astype(np.int32),
            empty=result.empty.cpu().numpy().astype(bool),
        )

    def scores(self, metric_id: str) -> list[GridScore]:
        """One :class:`~carve3d_reward.scores.GridScore` per grid: what every engine answers."""
        return batch_scores(self.mrc, self.distances, self.boxes, self.empty, metric_id)


class MRCModel:
    """The MRC metric behind a numpy interface (thread-compatible: call from one worker at a time)."""

    def __init__(self, settings: MetricSettings | None = None, metric: MRC | None = None) -> None:
        self.metric = metric or MRC(settings)
        self.settings = self.metric.settings

    @property
    def metric_id(self) -> str:
        return self.metric.metric_id

    def score(self, grids: np.ndarray | torch.Tensor, *, return_renders: bool = False) -> MRCResult:
        """Score ``[B, H, W, 3]`` grids (uint8, or float in [0, 1])."""
        return self.metric(to_grid_tensor(grids), return_renders=return_renders)

    def __call__(self, grids: np.ndarray) -> ModelOutputs:
        return ModelOutputs.from_result(self.score(grids))

    def score_grids(self, grids: np.ndarray | torch.Tensor, *, return_renders: bool = False) -> list[GridScore]:
        """One score per grid, with each view's re-render as PNG when asked (the in-process engine).

        Triton's scores come from the same arrays through the same function
        (:func:`~carve3d_reward.scores.batch_scores`), so the engines cannot differ.
        """
        result = self.score(grids, return_renders=return_renders)
        out = result.scores()
        if result.renders is not None:
            for item, renders in zip(out, result.renders, strict=True):
                item.renders = [encode_png(r) for r in renders]
        return out


def encode_png(image: torch.Tensor) -> bytes:
    """``[3, H, W]`` in [0, 1] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8_image(image)).save(buf, format="PNG")
    return buf.getvalue()
