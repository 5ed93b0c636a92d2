"""Silhouette carving: the weight-free reconstructor of the embedded default metric.

Why it measures consistency: a voxel visual hull keeps only the space that
every view sees as foreground, so a view whose silhouette disagrees with the
others carves the hull and its re-render loses area. Each view is then
re-rendered with colours taken from the *other* views ("holdout colour"): a
surface point seen by another view gets that view's colour, so a view whose
appearance disagrees with its neighbours is re-rendered differently from how
it was drawn, and its neighbours inherit its disagreement. Points no other
view sees keep the view's own colour (nothing could predict them).

Everything is batched over grids; rays are processed in chunks so memory
stays bounded at any batch size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cameras import Cameras, pixel_to_grid_sample
from .base import Reconstructor

#: Depth given to pixels whose ray misses the hull (never within tolerance of a surface).
_FAR = 1.0e4


@dataclass(frozen=True)
class CarveConfig:
    """Hyper-parameters of the carving reconstructor."""

    resolution: int = 64  # voxels per side of the grid spanning [-box, box]^3
    samples_per_ray: int = 128  # uniform samples inside the box along each ray
    fg_threshold: float = 0.95  # a pixel is foreground if any channel is below
    box: float = 1.0  # half-size of the reconstruction box
    visibility_tol_voxels: float = 3.0  # depth slack, in voxels, for "this view sees that point"
    facing_power: float = 3.0  # other views count by cos(surface normal, direction to them) ** power
    self_weight: float = 0.1  # weight of the view's own colour (dominates only where no other view sees well)
    chunk_rays: int = 1 << 16  # rays (summed over the batch) marched at once


@dataclass
class CarveScene:
    """A batch of carved hulls with what rendering needs from the inputs."""

    occupancy: Tensor  # [B, 1, G, G, G] soft occupancy in [0, 1], indexed (z, y, x)
    normals: Tensor  # [B, 3, G, G, G] outward (unnormalised) normals: minus the occupancy gradient
    views: Tensor  # [B, V, 3, S, S] input views
    masks: Tensor  # [B, V, 1, S, S] input foreground masks
    depth: Tensor  # [B, V, S, S] z-depth of the hull seen from each input camera (_FAR: no hit)
    cameras: Cameras  # the input cameras


class CarveReconstructor(Reconstructor):
    """Voxel visual hull coloured from the other views (see module docstring)."""

    name = "carve"

    def __init__(self, config: CarveConfig | None = None) -> None:
        self.config = config or CarveConfig()
        self.device = torch.device("cpu")

    def fingerprint(self) -> str:
        """Hash of every hyper-parameter that changes a render (not the chunk size)."""
        params = {k: v for k, v in asdict(self.config).items() if k != "chunk_rays"}
        return "carve-" + hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]

    def to(self, device: str | torch.device) -> CarveReconstructor:
        self.device = torch.device(device)
        return self

    # -- reconstruction ---------------------------------------------------------------------------
    def voxel_centres(self) -> Tensor:
        """Voxel centres ``[G, G, G, 3]`` as (x, y, z), indexed (z, y, x) like ``grid_sample``."""
        g, box = self.config.resolution, self.config.box
        c = (torch.arange(g, dtype=torch.float32, device=self.device) + 0.5) * (2 * box / g) - box
        z, y, x = torch.meshgrid(c, c, c, indexing="ij")
        return torch.stack([x, y, z], dim=-1)

    def reconstruct(self, views: Tensor, cameras: Cameras) -> CarveScene:
        views = views.to(self.device, torch.float32)
        cameras = cameras.to(self.device)
        b, _, _, s, _ = views.shape
        g = self.config.resolution
        masks = (views < self.config.fg_threshold).any(dim=2).to(torch.float32)  # [B, V, S, S]
        centres = self.voxel_centres().reshape(-1, 3)
        uv, depth = cameras.project(centres, s)  # [V, N, 2], [V, N]
        grid = pixel_to_grid_sample(uv, s)[:, None]  # [V, 1, N, 2]
        # One grid per view; the batch rides along as channels so all grids share the projection.
        seen = F.grid_sample(masks.transpose(0, 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        seen = seen[:, :, 0] * (depth > 0)[:, None].to(seen.dtype)  # [V, B, N]
        occupancy = seen.amin(dim=0).reshape(b, 1, g, g, g)
        grads = torch.gradient(occupancy[:, 0], dim=(3, 2, 1))  # d/dx, d/dy, d/dz
        normals = -torch.stack(grads, dim=1)
        scene = CarveScene(occupancy, normals, views, masks[:, :, None], torch.empty(0), cameras)
        scene.depth, _ = self._march(occupancy, cameras, s)
        return scene

    # -- rendering --------------------------------------------------------------------------------
    def render(self, scene: CarveScene, cameras: Cameras, size: int) -> Tensor:
        cameras = cameras.to(self.device)
        b, v_in, _, s_in, _ = scene.views.shape
        same = len(cameras) == len(scene.cameras) and torch.allclose(cameras.c2w, scene.cameras.c2w)
        if same and size == s_in and cameras.fov_deg == scene.cameras.fov_deg:
            depth = scene.depth
            points = self._unproject(depth, cameras, size)
        else:
            depth, points = self._march(scene.occupancy, cameras, size)
        v_out = len(cameras)
        hit = depth < _FAR  # [B, Vo, s, s]
        pts = points.reshape(b, -1, 3)  # [B, P, 3]

        uv, z = scene.cameras.project(pts, s_in)  # [B, Vi, P, 2], [B, Vi, P]
        grid = pixel_to_grid_sample(uv, s_in).reshape(b * v_in, 1, -1, 2)
        # Premultiplied sampling: background pixels never bleed white into a surface colour.
        premult = torch.cat([scene.views * scene.masks, scene.masks], dim=2).reshape(b * v_in, 4, s_in, s_in)
        sampled = F.grid_sample(premult, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled = sampled.reshape(b, v_in, 4, -1)
        coverage = sampled[:, :, 3]  # [B, Vi, P]
        colours = sampled[:, :, :3] / coverage[:, :, None].clamp_min(1e-6)
        surface = F.grid_sample(
            scene.depth.reshape(b * v_in, 1, s_in, s_in),
            grid,
            mode="nearest",
            padding_mode="border",
            align_corners=False,
        ).reshape(b, v_in, -1)
        tol = self.config.visibility_tol_voxels * 2 * self.config.box / self.config.resolution
        visible = ((z - surface).abs() < tol).to(torch.float32) * coverage  # [B, Vi, P]

        # How squarely each input camera sees the surface: grazing views predict colours badly.
        normal_grid = (pts / self.config.box)[:, :, None, None]  # [B, P, 1, 1, 3]
        normals = F.grid_sample(scene.normals, normal_grid, mode="bilinear", align_corners=False)
        normals = F.normalize(normals[:, :, :, 0, 0], dim=1)  # [B, 3, P]
        to_cam = F.normalize(scene.cameras.centers[None, :, None, :] - pts[:, None], dim=-1)  # [B, Vi, P, 3]
        facing = torch.einsum("bvpc,bcp->bvp", to_cam, normals).clamp_min(0.0) ** self.config.facing_power

        # Holdout: a target camera takes colour from the input camera it coincides with only as a fallback.
        dist = torch.cdist(cameras.centers.to(torch.float64), scene.cameras.centers.to(torch.float64))
        is_self = (dist < 1e-4).to(torch.float32)  # [Vo, Vi]
        per_target = pts.shape[1] // v_out
        is_self = is_self.repeat_interleave(per_target, dim=0).T[None]  # [1, Vi, P]
        weights = visible * (facing * (1 - is_self) + self.config.self_weight * is_self)
        # Points no input camera sees at all (rare: grazing rays) take the plain mean of projections.
        none = weights.sum(dim=1, keepdim=True) <= 1e-6
        weights = torch.where(none, coverage + 1e-6, weights)
        weights = weights / weights.sum(dim=1, keepdim=True)
        colour = (colours * weights[:, :, None]).sum(dim=1)  # [B, 3, P]
        colour = colour.reshape(b, 3, v_out, size, size).transpose(1, 2)
        white = torch.ones_like(colour)
        return torch.where(hit[:, :, None], colour, white).clamp(0.0, 1.0)

    # -- ray marching -----------------------------------------------------------------------------
    def _march(self, occupancy: Tensor, cameras: Cameras, size: int) -> tuple[Tensor, Tensor]:
        """First crossing of occupancy 0.5 along every pixel's ray.

        Returns z-depth ``[B, V, s, s]`` (``_FAR`` where the ray misses) and
        the hit points ``[B, V, s, s, 3]``.
        """
        b = occupancy.shape[0]
        origins, dirs = cameras.rays(size)  # [V, s, s, 3]
        v = origins.shape[0]
        o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
        t_near, t_far = _box_intersect(o, d, self.config.box)  # [R]
        t_near = torch.where(t_far > t_near, t_near, torch.zeros_like(t_near))  # a miss samples the camera centre
        o_grid, d_grid = o / self.config.box, d / self.config.box  # grid_sample works in [-1, 1]
        n = self.config.samples_per_ray
        steps = (torch.arange(n, dtype=torch.float32, device=o.device) + 0.5) / n  # [n]
        chunk = max(1, self.config.chunk_rays // b)
        t_hit = torch.full((b, o.shape[0]), float("inf"), device=o.device)
        for start in range(0, o.shape[0], chunk):
            sl = slice(start, start + chunk)
            span = (t_far[sl] - t_near[sl]).clamp_min(0.0)
            t = t_near[sl, None] + steps[None] * span[:, None]  # [r, n]
            grid = torch.addcmul(o_grid[sl, None], t[..., None], d_grid[sl, None])  # [r, n, 3]
            grid = grid.expand(b, -1, -1, -1)[:, :, :, None]  # [B, r, n, 1, 3]
            occ = F.grid_sample(occupancy, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            occ = occ[:, 0, :, :, 0]  # [B, r, n]; zero outside the box (padding)
            t_hit[:, sl] = _first_crossing(occ, t)
        z_axis = -cameras.c2w[:, :3, 2]  # viewing direction per camera
        cos = (dirs * z_axis[:, None, None, :]).sum(-1).reshape(-1)  # [R]
        hit = torch.isfinite(t_hit)
        points = o[None] + torch.where(hit, t_hit, 0.0)[..., None] * d[None]
        depth = torch.where(hit, t_hit * cos[None], torch.full_like(t_hit, _FAR))
        return depth.reshape(b, v, size, size), points.reshape(b, v, size, size, 3)

    def _unproject(self, depth: Tensor, cameras: Cameras, size: int) -> Tensor:
        """Hit points ``[B, V, s, s, 3]`` from z-depth maps (inverse of :meth:`_march`)."""
        origins, dirs = cameras.rays(size)
        cos = (dirs * -cameras.c2w[:, None, None, :3, 2]).sum(-1)
        t = torch.where(depth < _FAR, depth / cos[None], torch.zeros_like(depth))
        return origins[None] + t[..., None] * dirs[None]


def _box_intersect(origins: Tensor, dirs: Tensor, box: float) -> tuple[Tensor, Tensor]:
    """Slab test against ``[-box, box]^3``: entry and exit distances ``[R]`` (exit < entry: miss)."""
    inv = 1.0 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0 = (-box - origins) * inv
    t1 = (box - origins) * inv
    t_near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(0.0)
    t_far = torch.maximum(t0, t1).amin(dim=-1)
    return t_near, t_far


def _first_crossing(occ: Tensor, t: Tensor) -> Tensor:
    """Distance where occupancy first reaches 0.5, linearly interpolated; inf where never."""
    inside = occ >= 0.5  # [B, r, n]
    any_hit = inside.any(dim=-1)
    k = inside.to(torch.uint8).argmax(dim=-1)  # first sample inside
    k_prev = (k - 1).clamp_min(0)
    o1 = occ.gather(-1, k[..., None])[..., 0]
    o0 = occ.gather(-1, k_prev[..., None])[..., 0]
    tt = t[None].expand(occ.shape[0], -1, -1)
    t1 = tt.gather(-1, k[..., None])[..., 0]
    t0 = tt.gather(-1, k_prev[..., None])[..., 0]
    frac = ((0.5 - o0) / (o1 - o0).clamp_min(1e-6)).clamp(0.0, 1.0)
    t_cross = torch.where(k > 0, t0 + frac * (t1 - t0), t1)
    return torch.where(any_hit, t_cross, torch.full_like(t_cross, float("inf")))
