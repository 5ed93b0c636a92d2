"""Floats to 8-bit pixels: one rule for the whole project.

``round(clip(x, 0, 1) * 255)`` with round-half-to-even, computed in float32,
for numpy arrays and torch tensors alike (the same rule in both, so a grid
quantised by the trainer, the client or the decoder is the same bytes). A
tensor is quantised where it lives, so a GPU batch shrinks to a quarter of its
bytes before it is copied off; torch is never imported for numpy input. NaN is
the caller's to refuse before quantising.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def to_uint8(values: Any) -> Any:
    """Floats in ``[0, 1]`` -> ``uint8`` of the same shape (a tensor stays a tensor on its device)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(values, torch.Tensor):
        return values.detach().to(torch.float32).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    arr = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    return np.rint(arr * np.float32(255.0)).astype(np.uint8)
