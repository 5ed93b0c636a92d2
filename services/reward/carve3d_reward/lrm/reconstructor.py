"""The learned reconstructor (``--reconstructor lrm``): InstantMesh-compatible triplane LRM.

How our cameras become the model's (see ``docs/lrm.md``): both conventions
are OpenGL camera-to-world with world z up, so no axis flip is needed.

* encoder input, per view, 16 numbers: ``c2w[:3, :4]`` row-major, then
  ``(fx, fy, cx, cy)`` divided by the image size (``Cameras.intrinsics_normalized``);
* render cameras: the same ``c2w`` and normalised intrinsics; rays go through
  pixel centres exactly as :meth:`Cameras.rays` does, so a render lines up
  pixel for pixel with the input view;
* ``radius`` (``lrm_radius``), when set, moves every camera along its own
  viewing line to that distance from the origin, for the encoder and for
  rendering alike: images and re-renders still line up (the scene the model
  builds scales with the cameras), only the object's size inside the model's
  ``[-1, 1]^3`` box changes.

Views are resized (bicubic, antialiased, clamped) to the model's input size
(320 for the published models) before encoding; renders are made at the
requested size, or at ``lrm_render_size`` and resized to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cameras import Cameras
from ..errors import ConfigError
from ..reconstructors.base import Reconstructor
from ..settings import MetricSettings
from .checkpoint import checkpoint_digest, load_generator, resolve_checkpoint
from .config import LRMConfig, get_preset
from .model import LRMGenerator

DType = Literal["fp32", "bf16", "fp16"]
_AUTOCAST: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class LRMOptions:
    """How the model is run (not what it is: that is :class:`LRMConfig`)."""

    dtype: DType = "fp32"  # autocast dtype of the encoder and transformer; rendering is always float32
    radius: float | None = None  # camera distance given to the model (None: the grid cameras' own)
    render_size: int | None = None  # render at this size, then resize (None: the requested size)
    samples_per_ray: int | None = None  # None: the preset's
    chunk_rays: int = 1 << 13  # rays x grids rendered at once (bounds memory)
    compile: bool = False  # torch.compile the encoder + transformer

    def __post_init__(self) -> None:
        if self.dtype not in _AUTOCAST:
            raise ConfigError(f"LRM dtype {self.dtype!r}: expected one of {', '.join(_AUTOCAST)}")
        if self.radius is not None and self.radius <= 0:
            raise ConfigError("LRM radius must be positive")


@dataclass
class LRMScene:
    """A batch of reconstructed triplanes."""

    planes: Tensor  # [B, 3, C, H, W] float32


def encoder_cameras(cameras: Cameras, radius: float | None = None) -> Tensor:
    """The model's per-view camera vector ``[V, 16]``: ``c2w[:3, :4]`` row-major + normalised ``(fx, fy, cx, cy)``."""
    c2w = placed_c2w(cameras, radius)
    return torch.cat([c2w[:, :3, :4].reshape(-1, 12), cameras.intrinsics_normalized().to(c2w)], dim=-1)


def placed_c2w(cameras: Cameras, radius: float | None = None) -> Tensor:
    """``cameras.c2w`` (float32), with centres moved to distance ``radius`` from the origin when given."""
    c2w = cameras.c2w.to(torch.float32).clone()
    if radius is not None:
        centres = c2w[:, :3, 3]
        c2w[:, :3, 3] = centres * (radius / centres.norm(dim=-1, keepdim=True).clamp_min(1e-9))
    return c2w


def _resize(images: Tensor, size: int) -> Tensor:
    """Bicubic, antialiased, clamped resize of ``[B, V, 3, h, w]`` (no-op at the same size)."""
    b, v, c, h, w = images.shape
    if h == size and w == size:
        return images
    flat = F.interpolate(images.reshape(b * v, c, h, w), size=(size, size), mode="bicubic", antialias=True)
    return flat.clamp(0.0, 1.0).reshape(b, v, c, size, size)


class LRMReconstructor(Reconstructor):
    """A feed-forward triplane reconstruction model behind the :class:`Reconstructor` interface."""

    name = "lrm"

    def __init__(self, model: LRMGenerator, *, digest: str, options: LRMOptions | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.config: LRMConfig = model.config
        self.digest = digest
        self.options = options or LRMOptions()
        self.device = next(model.parameters()).device
        self._planes_fn: Callable[[Tensor, Tensor], Tensor] = self.model.forward_planes
        if self.options.compile:
            self._planes_fn = torch.compile(self.model.forward_planes, dynamic=False)

    # -- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, s: MetricSettings) -> LRMReconstructor:
        """Find, verify and load the weights named by the settings (``lrm_*`` fields)."""
        config = get_preset(s.lrm_preset)
        path, sha256 = resolve_checkpoint(
            config, s.lrm_checkpoint, sha256=s.lrm_checkpoint_sha256, cache_dir=s.lrm_cache_dir, download=s.lrm_download
        )
        model = load_generator(config, path, sha256=sha256)
        options = LRMOptions(
            dtype=s.lrm_dtype,
            radius=s.lrm_radius,
            render_size=s.lrm_render_size,
            samples_per_ray=s.lrm_samples_per_ray,
            chunk_rays=s.lrm_chunk_rays,
            compile=s.lrm_compile,
        )
        return cls(model, digest=checkpoint_digest(path), options=options).to(s.device)

    def fingerprint(self) -> str:
        """``lrm-`` + the first 8 hex characters of the checkpoint file's sha256."""
        return f"lrm-{self.digest[:8]}"

    def to(self, device: str | torch.device) -> LRMReconstructor:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        dtype = _AUTOCAST[self.options.dtype]
        if dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=dtype):
            yield

    # -- the interface ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def reconstruct(self, views: Tensor, cameras: Cameras) -> LRMScene:
        if views.ndim != 5 or views.shape[1] != len(cameras):
            raise ConfigError(f"views {tuple(views.shape)} do not match {len(cameras)} cameras")
        images = _resize(views.to(self.device, torch.float32), self.config.input_size)
        cams = encoder_cameras(cameras.to(self.device), self.options.radius)
        cams = cams[None].expand(images.shape[0], -1, -1)
        with self._autocast():
            planes = self._planes_fn(images, cams)
        return LRMScene(planes.float())

    @torch.inference_mode()
    def render(self, scene: LRMScene, cameras: Cameras, size: int) -> Tensor:
        cameras = cameras.to(self.device)
        c2w = placed_c2w(cameras, self.options.radius)
        render_size = self.options.render_size or size
        rgb, _ = self.model.render(
            scene.planes,
            c2w,
            cameras.intrinsics_normalized().to(c2w),
            render_size,
            samples_per_ray=self.options.samples_per_ray,
            chunk_rays=self.options.chunk_rays,
        )
        return _resize(rgb, size).clamp(0.0, 1.0)
