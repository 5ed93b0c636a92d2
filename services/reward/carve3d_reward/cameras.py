"""Cameras of a multi-view grid, in one documented convention.

Convention (also in ``docs/cameras.md``, with a picture that proves it):

* World: right-handed, **z up**; the object sits at the origin inside the box
  ``[-1, 1]^3``.
* A camera at azimuth ``phi`` and elevation ``theta`` sits at
  ``r * (cos theta cos phi, cos theta sin phi, sin theta)``; azimuth turns
  counter-clockwise seen from above (from +x towards +y), elevation is the
  angle above the xy-plane. It looks at the origin with world +z as up.
* Camera-to-world matrices are OpenGL style: camera +x is image right, +y is
  image up, the camera looks along its -z.
* Pixels: ``u`` grows to the right, ``v`` grows downwards, the top-left corner
  of the top-left pixel is ``(0, 0)`` and pixel centres are at ``i + 0.5``.
  Square pixels, principal point at the image centre, ``fov`` is the full
  field of view of a square view.
* Increasing azimuth moves the camera towards its own image-right, which is
  the Instant3D layout: each tile's camera is on the image-right side of the
  previous tile's camera.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def look_at_c2w(eye: Tensor, target: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """OpenGL camera-to-world matrices ``[V, 4, 4]`` for cameras at ``eye [V, 3]``."""
    eye = eye.to(torch.float64)
    target = torch.zeros_like(eye) if target is None else target.to(eye).expand_as(eye)
    up = eye.new_tensor([0.0, 0.0, 1.0]) if up is None else up.to(eye)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, up.expand_as(forward)), dim=-1)
    cam_up = torch.linalg.cross(right, forward)
    c2w = torch.zeros(eye.shape[0], 4, 4, dtype=torch.float64)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = cam_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = eye
    c2w[:, 3, 3] = 1.0
    return c2w.to(torch.float32)


def orbit_positions(azimuths_deg: Tensor, elevations_deg: Tensor, radius: float) -> Tensor:
    """Camera centres ``[V, 3]`` on a sphere of ``radius`` around the origin."""
    phi = torch.deg2rad(azimuths_deg.to(torch.float64))
    theta = torch.deg2rad(elevations_deg.to(torch.float64))
    return radius * torch.stack([theta.cos() * phi.cos(), theta.cos() * phi.sin(), theta.sin()], dim=-1)


@dataclass(frozen=True)
class Cameras:
    """``V`` pinhole cameras shared by every grid of a batch.

    ``c2w`` is ``[V, 4, 4]`` (OpenGL convention above); ``fov_deg`` is the
    full field of view of a square view.
    """

    c2w: Tensor
    fov_deg: float

    def __len__(self) -> int:
        return int(self.c2w.shape[0])

    @property
    def centers(self) -> Tensor:
        """Camera centres ``[V, 3]``."""
        return self.c2w[:, :3, 3]

    def to(self, device: torch.device | str) -> Cameras:
        return Cameras(self.c2w.to(device), self.fov_deg)

    def focal_px(self, size: int) -> float:
        """Focal length in pixels for a ``size x size`` view."""
        return 0.5 * size / math.tan(math.radians(self.fov_deg) / 2)

    def intrinsics_normalized(self) -> Tensor:
        """``(fx, fy, cx, cy)`` divided by the image size, ``[V, 4]`` (LRM input)."""
        f = self.focal_px(1)
        row = self.c2w.new_tensor([f, f, 0.5, 0.5])
        return row.expand(len(self), 4).clone()

    def rays(self, size: int) -> tuple[Tensor, Tensor]:
        """Ray origins and unit directions through every pixel centre.

        Returns ``origins [V, size, size, 3]`` and ``dirs [V, size, size, 3]``
        (row ``v``, column ``u``).
        """
        f = self.focal_px(size)
        coords = (torch.arange(size, dtype=torch.float32, device=self.c2w.device) + 0.5 - size / 2) / f
        y, x = torch.meshgrid(-coords, coords, indexing="ij")  # image v grows down, camera y up
        d_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [S, S, 3]
        rot = self.c2w[:, :3, :3]  # [V, 3, 3]
        dirs = torch.einsum("vij,hwj->vhwi", rot, d_cam)
        dirs = torch.nn.functional.normalize(dirs, dim=-1)
        origins = self.centers[:, None, None, :].expand_as(dirs)
        return origins, dirs

    def project(self, points: Tensor, size: int) -> tuple[Tensor, Tensor]:
        """Project world points ``[..., N, 3]`` into every camera.

        Returns pixel coordinates ``[..., V, N, 2]`` as ``(u, v)`` and depth
        ``[..., V, N]`` (distance along the viewing axis; positive in front).
        """
        w2c = torch.linalg.inv(self.c2w)  # [V, 4, 4]
        rot, trans = w2c[:, :3, :3], w2c[:, :3, 3]
        cam = torch.einsum("vij,...nj->...vni", rot, points) + trans[:, None, :]
        depth = -cam[..., 2]
        f = self.focal_px(size)
        safe = depth.clamp_min(1e-6)
        u = f * cam[..., 0] / safe + size / 2
        v = -f * cam[..., 1] / safe + size / 2
        return torch.stack([u, v], dim=-1), depth


def pixel_to_grid_sample(uv: Tensor, size: int) -> Tensor:
    """Pixel coordinates -> ``grid_sample`` coordinates (``align_corners=False``)."""
    return uv * (2.0 / size) - 1.0
