"""The Triton model's tensor interface, and the one function that executes a batch of requests.

Model ``mrc`` (KServe v2; ``max_batch_size > 0``, so every shape below is per
sample and Triton prepends the batch dimension ``B``):

=========  ======  ===============  ==============  =============================================
tensor     dtype   dims (config)    full shape      meaning
=========  ======  ===============  ==============  =============================================
grids      UINT8   [-1, -1, 3]      [B, H, W, 3]    2x2 grids, row-major RGB, 0..255 (input)
mrc        FP32    [1]              [B, 1]          mean of the views' distances (lower is better)
distances  FP32    [-1]             [B, V]          per-view box-normalised distance
boxes      INT32   [-1, 4]          [B, V, 4]       square box x_min, y_min, x_max, y_max (inclusive)
empty      BOOL    [-1]             [B, V]          the view had no foreground pixel
=========  ======  ===============  ==============  =============================================

Why these shapes: ``H`` and ``W`` are free because the metric resizes views to
its working resolution (Triton's dynamic batcher only puts requests of equal
``H, W`` in one batch); ``V`` (4 for the 2x2 layout) is ``-1`` so other layouts
keep the same interface; ``mrc`` is ``[1]`` rather than a scalar because a
batched Triton tensor needs at least one dimension per sample (no ``reshape``
tricks, so the stock and PyTriton models have identical configs).

Only numpy and :mod:`carve3d_reward.model` are imported here: the stock Triton
Python backend (``services/reward/triton/model_repository/mrc/1/model.py``)
and the PyTriton binding both execute requests with :func:`run_requests`, the
gateway decodes replies with :func:`outputs_from_tensors`, so no engine can
drift from another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..model import OUTPUTS, ModelOutputs, MRCModel

#: Name of the model in every Triton model repository.
MODEL_NAME = "mrc"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model: name, dtypes (numpy, KServe v2, model config) and per-sample dims."""

    name: str
    numpy_dtype: type[np.generic]
    datatype: str  # KServe v2 / tritonclient name: "UINT8", "FP32", ...
    dims: tuple[int, ...]  # per sample; -1 = variable

    @property
    def config_dtype(self) -> str:
        """The ``data_type`` in ``config.pbtxt`` (``TYPE_UINT8``...)."""
        return "TYPE_" + ("STRING" if self.datatype == "BYTES" else self.datatype)


INPUT = TensorSpec("grids", np.uint8, "UINT8", (-1, -1, 3))
OUTPUT_SPECS: tuple[TensorSpec, ...] = (
    TensorSpec("mrc", np.float32, "FP32", (1,)),
    TensorSpec("distances", np.float32, "FP32", (-1,)),
    TensorSpec("boxes", np.int32, "INT32", (-1, 4)),
    TensorSpec("empty", np.bool_, "BOOL", (-1,)),
)
assert tuple(s.name for s in OUTPUT_SPECS) == OUTPUTS, "keep the Triton outputs in step with model.OUTPUTS"


def to_tensors(outputs: ModelOutputs) -> dict[str, np.ndarray]:
    """Model outputs -> the Triton output tensors (``mrc`` as ``[B, 1]``)."""
    arrays = outputs.as_dict()
    arrays["mrc"] = arrays["mrc"].reshape(-1, 1)
    return {s.name: np.ascontiguousarray(arrays[s.name], dtype=s.numpy_dtype) for s in OUTPUT_SPECS}


def outputs_from_tensors(tensors: Mapping[str, np.ndarray]) -> ModelOutputs:
    """Triton output tensors (as received by a client) -> :class:`ModelOutputs`."""
    mrc = np.asarray(tensors["mrc"], dtype=np.float32).reshape(-1)
    n = mrc.shape[0]
    return ModelOutputs(
        mrc=mrc,
        distances=np.asarray(tensors["distances"], dtype=np.float32).reshape(n, -1),
        boxes=np.asarray(tensors["boxes"], dtype=np.int32).reshape(n, -1, 4),
        empty=np.asarray(tensors["empty"], dtype=bool).reshape(n, -1),
    )


def run_requests(model: MRCModel, grids: Sequence[np.ndarray]) -> list[dict[str, np.ndarray] | Exception]:
    """Execute the requests of one Triton batch: ``grids[i]`` is request ``i``'s ``[b_i, H, W, 3]`` uint8.

    Requests of the same ``H, W`` are concatenated and scored by one model call
    (the metric is batch-invariant: a grid scores the same alone or batched).
    If a concatenated call raises, its requests are scored one by one, so a bad
    request fails alone; its slot then holds the exception.
    """
    results: list[dict[str, np.ndarray] | Exception] = [ValueError("not executed")] * len(grids)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, g in enumerate(grids):
        groups.setdefault(tuple(np.shape(g)[1:]), []).append(i)
    for members in groups.values():
        try:
            batch = np.concatenate([np.asarray(grids[i], dtype=np.uint8) for i in members])
            tensors = to_tensors(model(batch))
        except Exception as exc:  # noqa: BLE001 - isolate the failing request
            if len(members) == 1:
                results[members[0]] = exc
            else:
                for i in members:
                    results[i] = _run_one(model, grids[i])
            continue
        start = 0
        for i in members:
            stop = start + len(grids[i])
            results[i] = {name: array[start:stop] for name, array in tensors.items()}
            start = stop
    return results


def _run_one(model: MRCModel, grids: np.ndarray) -> dict[str, np.ndarray] | Exception:
    try:
        return to_tensors(model(np.asarray(grids, dtype=np.uint8)))
    except Exception as exc:  # noqa: BLE001 - reported to this request's client as its error
        return exc
