"""One grid's score: the same object wherever a score exists.

The metric makes it (:meth:`carve3d_reward.metric.MRCResult.scores`), the
engines and the CLI answer with it, it crosses the wire as the ``GridScore``
message of ``proto/mrc.proto`` (:meth:`GridScore.to_wire` /
:meth:`GridScore.from_wire`), and the client hands it to the trainer. Torch-free,
so a client needs nothing heavier than numpy to read one.

Every score carries a :class:`Status`; only ``ok`` scores belong in
statistics. A grid that could not be scored is never a silent 0: its ``mrc``
and ``reward`` are ``None`` and ``error`` says why.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np

from . import __version__


class Status(StrEnum):
    """What a score may be used for."""

    OK = "ok"  # scored: use it
    EMPTY_VIEW = "empty_view"  # scored, but a view had no foreground (its distance is the worst value): keep it out
    INVALID = "invalid"  # not scored: the input cannot be used (``error`` says why)
    ERROR = "error"  # not scored: the server failed on this grid alone; retrying may help


@dataclass(frozen=True)
class ViewScore:
    """One view's part of a score."""

    distance: float
    bbox: tuple[int, int, int, int]  # (x_min, y_min, x_max, y_max), inclusive, working-resolution pixels
    empty: bool

    def to_wire(self) -> dict[str, Any]:
        return {"distance": self.distance, "bbox": list(self.bbox), "empty": self.empty}

    @classmethod
    def from_wire(cls, obj: Any) -> ViewScore:
        if not isinstance(obj, dict):
            raise TypeError("a ViewScore must be a map")
        bbox = obj.get("bbox") or [0, 0, 0, 0]
        if not (isinstance(bbox, list | tuple) and len(bbox) == 4):
            raise TypeError("'bbox' must be 4 integers")
        x0, y0, x1, y1 = (int(v) for v in bbox)
        return cls(float(obj.get("distance", float("nan"))), (x0, y0, x1, y1), bool(obj.get("empty", False)))


@dataclass
class GridScore:
    """The score of one grid (``GridScore`` of ``proto/mrc.proto``)."""

    mrc: float | None
    reward: float | None
    status: Status
    views: list[ViewScore] = field(default_factory=list)
    metric: str = ""
    version: str = __version__
    error: str = ""  # why the grid was not scored ("invalid", "error")
    renders: list[bytes] = field(default_factory=list, repr=False)  # PNG re-render of each view, if asked for
    request_id: str = ""  # on the client: the id of the request that carried this grid

    def __post_init__(self) -> None:
        self.status = Status(self.status)

    # -- making one --------------------------------------------------------------------------------
    @classmethod
    def scored(
        cls,
        mrc: float,
        distances: Sequence[float],
        boxes: Sequence[Sequence[int]],
        empty: Sequence[bool],
        metric: str,
    ) -> GridScore:
        """A computed score: the only place a status is derived from the views."""
        views = [
            ViewScore(float(d), (int(b[0]), int(b[1]), int(b[2]), int(b[3])), bool(e))
            for d, b, e in zip(distances, boxes, empty, strict=True)
        ]
        status = Status.EMPTY_VIEW if any(v.empty for v in views) else Status.OK
        return cls(mrc=float(mrc), reward=-float(mrc), status=status, views=views, metric=metric)

    @classmethod
    def invalid(cls, error: str, metric: str, status: Status = Status.INVALID) -> GridScore:
        """A grid that was not scored, and why."""
        return cls(mrc=None, reward=None, status=status, metric=metric, error=error)

    def without_renders(self) -> GridScore:
        return replace(self, renders=[]) if self.renders else self

    # -- using one ---------------------------------------------------------------------------------
    @property
    def ok(self) -> bool:
        """Scored, and no view was empty: the score can go into statistics."""
        return self.status is Status.OK

    @property
    def valid(self) -> bool:
        """Same as :attr:`ok`."""
        return self.ok

    def render_arrays(self) -> list[np.ndarray]:
        """The re-renders (``return_renders=True``) decoded as ``uint8 [S, S, 3]`` arrays."""
        return [decode_png(png) for png in self.renders]

    # -- the wire ----------------------------------------------------------------------------------
    def to_wire(self) -> dict[str, Any]:
        """The ``GridScore`` message as a map (bytes stay bytes: msgpack bin, base64 in JSON)."""
        out: dict[str, Any] = {
            "mrc": self.mrc,
            "reward": self.reward,
            "status": self.status.value,
            "views": [v.to_wire() for v in self.views],
            "metric": self.metric,
            "version": self.version,
        }
        if self.error:
            out["error"] = self.error
        if self.renders:
            out["renders"] = list(self.renders)
        return out

    @classmethod
    def from_wire(cls, obj: Any, *, request_id: str = "") -> GridScore:
        """Read one decoded ``GridScore`` map; ``ValueError`` or ``TypeError`` says what is wrong with it."""
        if not isinstance(obj, dict) or not isinstance(obj.get("status"), str):
            raise TypeError("a GridScore must be a map with a string 'status'")
        views, renders = obj.get("views") or [], obj.get("renders") or []
        if not isinstance(views, list):
            raise TypeError("'views' must be a list of maps")
        if not isinstance(renders, list) or not all(isinstance(r, bytes) for r in renders):
            raise TypeError("'renders' must be a list of bytes")
        return cls(
            mrc=_opt_float(obj.get("mrc")),
            reward=_opt_float(obj.get("reward")),
            status=Status(obj["status"]),
            views=[ViewScore.from_wire(v) for v in views],
            metric=str(obj.get("metric") or ""),
            version=str(obj.get("version") or ""),
            error=str(obj.get("error") or ""),
            renders=list(renders),
            request_id=request_id,
        )


def decode_png(data: bytes) -> np.ndarray:
    """PNG (or any image) bytes -> ``uint8 [H, W, 3]``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def batch_scores(mrc: Any, distances: Any, boxes: Any, empty: Any, metric: str) -> list[GridScore]:
    """Scores from batched arrays or tensors (``[B]``, ``[B, V]``, ``[B, V, 4]``, ``[B, V]``): one per grid."""
    rows = zip(mrc.tolist(), distances.tolist(), boxes.tolist(), empty.tolist(), strict=True)
    return [GridScore.scored(m, d, b, e, metric) for m, d, b, e in rows]


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
