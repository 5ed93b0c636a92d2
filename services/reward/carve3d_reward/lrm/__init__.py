"""InstantMesh-compatible sparse-view LRM (triplane NeRF): the ``lrm`` reconstructor.

One file per part: :mod:`.config` (hyper-parameters and presets),
:mod:`.encoder` (camera-modulated DINO ViT), :mod:`.decoder` (triplane
transformer), :mod:`.renderer` (triplane NeRF volume rendering),
:mod:`.model` (the generator), :mod:`.checkpoint` (weights: find, fetch,
verify, load) and :mod:`.reconstructor` (the :class:`Reconstructor`).
See ``docs/lrm.md``.
"""

from .config import PRESETS, LRMConfig, get_preset
from .model import LRMGenerator, build_generator

__all__ = ["PRESETS", "LRMConfig", "LRMGenerator", "build_generator", "get_preset"]
