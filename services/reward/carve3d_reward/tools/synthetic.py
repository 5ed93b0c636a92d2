"""Procedural multi-view data: random textured primitive scenes and an analytic renderer.

Why: the tests, the ``mrc validate`` experiment (the paper's Sec. 3.3, MRC
against a controlled inconsistency level) and the demo need multi-view grids
whose 3D consistency is known exactly, without model weights or downloads.

* A :class:`SceneBatch` holds ``B`` scenes of up to ``K`` primitives
  (ellipsoid, box, capped cylinder), each placed by an affine map and painted
  with a two-colour procedural texture (stripes, 3D checker or rings) defined
  in the primitive's local frame, so surfaces have texture, not flat colour.
* :func:`render_scenes` ray-casts them analytically (each primitive is the
  unit sphere / cube / capped cylinder in its local frame) with view-independent
  Lambertian shading from fixed world-space lights, on a white background, so
  the views of one scene are exactly 3D-consistent.
* :func:`inconsistent_views` breaks one view in a controlled way (``patch``,
  ``pose`` or ``colour``) with a level in ``[0, 1]``.

Everything is deterministic from integer seeds; scene ``i`` of
``random_scenes(n, seed)`` depends only on ``(seed, i)``, not on ``n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cameras import Cameras
from ..grid import join_grid
from ..layouts import INSTANT3D_2X2, GridLayout

#: Primitive kinds, by their integer code in :attr:`SceneBatch.kind`.
PRIMITIVE_KINDS = ("ellipsoid", "box", "cylinder")
ELLIPSOID, BOX, CYLINDER = 0, 1, 2
#: Texture kinds, by their integer code in :attr:`SceneBatch.texture`.
TEXTURE_KINDS = ("stripes", "checker", "rings")
STRIPES, CHECKER, RINGS = 0, 1, 2
#: Kinds of controlled one-view inconsistency accepted by :func:`inconsistent_views`.
INCONSISTENCY_KINDS = ("patch", "pose", "colour")

#: Random scenes stay inside this radius of the origin (fits a 50 deg view from radius 2.7).
SCENE_RADIUS = 0.9
#: Bounding-sphere radius of each unit primitive (per unit of its largest scale).
_KIND_BOUND = (1.0, math.sqrt(3.0), math.sqrt(2.0))
#: Shading: ``ambient + sum_i weight_i * max(0, n . light_i)``; the weights sum to 1 - ambient,
#: so a shaded pixel is never brighter than its texture colour (which is never near white).
AMBIENT = 0.45
LIGHT_DIRS = ((0.45, 0.3, 0.85), (-0.6, -0.35, 0.3))
LIGHT_WEIGHTS = (0.4, 0.15)
#: Maximum pose error (degrees of rotation about world z) at inconsistency level 1.
POSE_MAX_DEG = 60.0
#: Maximum hue rotation (degrees) at inconsistency level 1.
HUE_MAX_DEG = 180.0
#: Upper bound on ray x primitive pairs held in memory at once (chunking over rays beyond it).
_MAX_PAIRS = 1 << 22
_EPS = 1e-6
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SceneBatch:
    """``B`` procedural scenes of up to ``K`` primitives each (padded; see ``active``).

    ``world_to_local [B, K, 3, 4]`` maps a world point ``x`` to ``A x + b`` in the
    primitive's local frame, where it is the unit sphere (ellipsoid), the cube
    ``[-1, 1]^3`` (box) or the cylinder ``x^2 + y^2 <= 1, |z| <= 1``. Colours are
    RGB in ``[0, 1]``; ``frequency`` is in texture cycles per local unit.
    """

    kind: Tensor  # [B, K] int64, index into PRIMITIVE_KINDS
    active: Tensor  # [B, K] bool
    world_to_local: Tensor  # [B, K, 3, 4] float32
    colour_a: Tensor  # [B, K, 3] float32
    colour_b: Tensor  # [B, K, 3] float32
    texture: Tensor  # [B, K] int64, index into TEXTURE_KINDS
    frequency: Tensor  # [B, K] float32

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    @property
    def max_primitives(self) -> int:
        return int(self.kind.shape[1])

    @property
    def device(self) -> torch.device:
        return self.world_to_local.device

    def __getitem__(self, index: int | slice | Tensor) -> SceneBatch:
        """A sub-batch (an integer keeps the batch dimension, so a scene is a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return SceneBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device: torch.device | str) -> SceneBatch:
        return SceneBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def centres(self) -> Tensor:
        """World position ``[B, K, 3]`` of each primitive's local origin (its centre)."""
        a, b = self.world_to_local[..., :3], self.world_to_local[..., 3]
        return -torch.linalg.solve(a, b)

    def rotated_z(self, degrees: float | Tensor) -> SceneBatch:
        """The scenes rotated about the world z axis by ``degrees`` (scalar or ``[B]``), counter-clockwise."""
        rz = _rot_z(_per_scene(degrees, len(self), self.device))  # [B, 3, 3]
        a, b = self.world_to_local[..., :3], self.world_to_local[..., 3:]
        # The rotated object contains y iff the original contains Rz^T y.
        a_new = torch.einsum("bkij,bjl->bkil", a, rz.transpose(1, 2))
        return SceneBatch(
            self.kind, self.active, torch.cat([a_new, b], dim=-1), self.colour_a, self.colour_b,
            self.texture, self.frequency,
        )  # fmt: skip

    @staticmethod
    def from_placements(
        kind: Tensor,
        rotation: Tensor,
        scale: Tensor,
        translation: Tensor,
        colour_a: Tensor,
        colour_b: Tensor,
        texture: Tensor,
        frequency: Tensor,
        active: Tensor | None = None,
    ) -> SceneBatch:
        """Build a batch from placements: local point ``p`` sits at ``R diag(scale) p + translation``.

        Shapes: ``kind, texture, frequency, active [B, K]``; ``rotation [B, K, 3, 3]``;
        ``scale, translation, colour_a, colour_b [B, K, 3]``. Why: hand-made scenes
        (tests, demos) should not have to invert matrices themselves.
        """
        rotation = rotation.to(torch.float32)
        inv_scale = 1.0 / scale.to(torch.float32)
        a = inv_scale[..., :, None] * rotation.transpose(-1, -2)  # diag(1/s) R^T
        b = -torch.einsum("bkij,bkj->bki", a, translation.to(torch.float32))
        if active is None:
            active = torch.ones(kind.shape, dtype=torch.bool, device=kind.device)
        return SceneBatch(
            kind=kind.to(torch.int64),
            active=active.to(torch.bool),
            world_to_local=torch.cat([a, b[..., None]], dim=-1).contiguous(),
            colour_a=colour_a.to(torch.float32),
            colour_b=colour_b.to(torch.float32),
            texture=texture.to(torch.int64),
            frequency=frequency.to(torch.float32),
        )


# --------------------------------------------------------------------------- random scenes


def _mix_seed(*values: int) -> int:
    """SplitMix64-style hash of integers -> a 63-bit seed (decorrelates ``(seed, index)`` pairs)."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = ((h ^ (int(v) & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """HSV (hue in turns) -> RGB ``[..., 3]``."""
    k = (torch.stack([torch.full_like(h, 5.0), torch.full_like(h, 3.0), torch.full_like(h, 1.0)], -1)
         + (h % 1.0)[..., None] * 6.0) % 6.0  # fmt: skip
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return v[..., None] - v[..., None] * s[..., None] * ramp


def _quat_to_rot(q: Tensor) -> Tensor:
    """Unit quaternions ``[..., 4]`` (w, x, y, z) -> rotation matrices ``[..., 3, 3]``."""
    q = F.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def _scenes_from_seeds(seeds: list[int], max_primitives: int) -> SceneBatch:
    """One scene per seed; each scene's random numbers come from its own generator."""
    k = max_primitives
    uniforms, normals = [], []
    for s in seeds:  # scene generation only (cheap); rendering never loops over scenes
        g = torch.Generator().manual_seed(s)
        uniforms.append(torch.rand(k, 16, generator=g))
        normals.append(torch.randn(k, 7, generator=g))
    u = torch.stack(uniforms)  # [B, K, 16]
    nrm = torch.stack(normals)  # [B, K, 7]
    n = len(seeds)

    kind = (u[..., 0] * len(PRIMITIVE_KINDS)).long().clamp_max(len(PRIMITIVE_KINDS) - 1)
    count = 1 + (u[:, 0, 14] * k).long().clamp_max(k - 1)  # 1..K primitives
    active = torch.arange(k)[None, :] < count[:, None]

    first = torch.zeros(n, k, dtype=torch.bool)
    first[:, 0] = True
    base = torch.where(first, 0.35 + 0.2 * u[..., 1], 0.15 + 0.25 * u[..., 1])
    scale = base[..., None] * (0.6 + 0.8 * u[..., 2:5])
    bound_factor = torch.tensor(_KIND_BOUND)[kind]
    bound = bound_factor * scale.amax(-1)
    shrink = (0.8 / bound).clamp_max(1.0)  # keep every primitive's bounding sphere <= 0.8
    scale, bound = scale * shrink[..., None], bound * shrink
    direction = F.normalize(nrm[..., 4:7], dim=-1)
    offset = (SCENE_RADIUS - 0.02 - bound) * u[..., 5].sqrt()
    offset = torch.where(first, offset * 0.5, offset)  # the main primitive stays near the middle
    translation = direction * offset[..., None]
    rotation = _quat_to_rot(nrm[..., 0:4])

    hue_a = u[..., 6]
    colour_a = _hsv_to_rgb(hue_a, 0.55 + 0.45 * u[..., 7], 0.55 + 0.4 * u[..., 8])
    colour_b = _hsv_to_rgb(hue_a + 0.2 + 0.6 * u[..., 9], 0.5 + 0.5 * u[..., 10], 0.35 + 0.55 * u[..., 11])
    texture = (u[..., 12] * len(TEXTURE_KINDS)).long().clamp_max(len(TEXTURE_KINDS) - 1)
    frequency = 1.0 + 2.0 * u[..., 13]
    return SceneBatch.from_placements(
        kind, rotation, scale, translation, colour_a, colour_b, texture, frequency, active
    )


def random_scenes(n: int, seed: int, max_primitives: int = 4) -> SceneBatch:
    """``n`` random compositions of 1..``max_primitives`` textured primitives, deterministic from ``seed``.

    Every primitive lies within :data:`SCENE_RADIUS` of the origin; colours are
    saturated (no channel triple near white) so the foreground is clearly
    distinguishable from the white background.
    """
    if n < 0 or max_primitives < 1:
        raise ValueError(f"need n >= 0 and max_primitives >= 1, got n={n}, max_primitives={max_primitives}")
    return _scenes_from_seeds([_mix_seed(seed, i) for i in range(n)], max_primitives)


def _scene_keys(scenes: SceneBatch) -> list[int]:
    """A deterministic integer per scene from its content (so derived randomness is per scene, not per slot)."""
    flat = torch.cat(
        [scenes.world_to_local.flatten(1), scenes.colour_a.flatten(1), scenes.frequency.flatten(1)], dim=1
    ).to(torch.float32).cpu().contiguous()  # fmt: skip
    bits = flat.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    weights = (torch.arange(bits.shape[1], dtype=torch.int64) * 2 + 1) * 0x9E3779B1
    mixed = (bits * weights).sum(dim=1)  # wraps deterministically in int64
    return [int(x) for x in mixed.tolist()]


# --------------------------------------------------------------------------- rendering


def _per_scene(value: float | Tensor, n: int, device: torch.device) -> Tensor:
    """A scalar or ``[B]`` value -> float32 ``[B]``."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"expected a scalar or a tensor of shape [{n}], got {list(t.shape)}")
    return t


def _rot_z(degrees: Tensor) -> Tensor:
    """Counter-clockwise rotations about +z, ``[B] -> [B, 3, 3]``."""
    r = torch.deg2rad(degrees.to(torch.float64))
    c, s, z, o = r.cos(), r.sin(), torch.zeros_like(r), torch.ones_like(r)
    return torch.stack([c, -s, z, s, c, z, z, z, o], dim=-1).reshape(-1, 3, 3).to(torch.float32)


def _lin(m: Tensor, v: Tensor) -> Tensor:
    """``m [..., 3, 3] @ v [..., 3]`` written elementwise, so results do not depend on the batch size."""
    x, y, z = v[..., 0:1], v[..., 1:2], v[..., 2:3]
    return m[..., 0] * x + m[..., 1] * y + m[..., 2] * z


def _lin_t(m: Tensor, v: Tensor) -> Tensor:
    """``m^T v`` for ``m [..., 3, 3]``, ``v [..., 3]``, elementwise."""
    x, y, z = v[..., 0:1], v[..., 1:2], v[..., 2:3]
    return m[..., 0, :] * x + m[..., 1, :] * y + m[..., 2, :] * z


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    den = torch.where(den.abs() < 1e-12, torch.full_like(den, 1e-12), den)
    return num / den


def _intersect(kind: int, o: Tensor, d: Tensor) -> Tensor:
    """Entry distance of rays ``o [P, V, 1, 3] + t d [P, V, R, 3]`` with a unit primitive; ``inf`` on a miss."""
    if kind == ELLIPSOID:
        a = (d * d).sum(-1)
        b = (o * d).sum(-1)
        c = (o * o).sum(-1) - 1.0
        disc = b * b - a * c
        t = (-b - disc.clamp_min(0.0).sqrt()) / a
        hit = (disc >= 0) & (t > _EPS)
    elif kind == BOX:
        t1 = _safe_div(-1.0 - o, d)
        t2 = _safe_div(1.0 - o, d)
        t = torch.minimum(t1, t2).amax(-1)
        t_out = torch.maximum(t1, t2).amin(-1)
        hit = (t <= t_out) & (t > _EPS)
    elif kind == CYLINDER:
        ox, oy, oz = o[..., 0], o[..., 1], o[..., 2]
        dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
        a = dx * dx + dy * dy
        b = ox * dx + oy * dy
        c = ox * ox + oy * oy - 1.0
        disc = b * b - a * c
        sq = disc.clamp_min(0.0).sqrt()
        side = a > 1e-12
        a_safe = torch.where(side, a, torch.ones_like(a))
        inside = (c <= 0).expand_as(a)
        inf = torch.full_like(a, math.inf)
        tc_in = torch.where(side, (-b - sq) / a_safe, torch.where(inside, -inf, inf))
        tc_out = torch.where(side, (-b + sq) / a_safe, torch.where(inside, inf, -inf))
        tz1 = _safe_div(-1.0 - oz, dz)
        tz2 = _safe_div(1.0 - oz, dz)
        t = torch.maximum(tc_in, torch.minimum(tz1, tz2))
        t_out = torch.minimum(tc_out, torch.maximum(tz1, tz2))
        hit = torch.where(side, disc >= 0, inside) & (t <= t_out) & (t > _EPS)
    else:  # pragma: no cover - kinds come from PRIMITIVE_KINDS
        raise ValueError(f"unknown primitive kind code {kind}")
    return torch.where(hit, t, torch.full_like(t, math.inf))


def _local_normal(kind: Tensor, p: Tensor) -> Tensor:
    """Outward normal in the local frame at a surface point ``p [..., 3]`` of each ``kind [...]``."""
    ax = p.abs()
    box = torch.zeros_like(p).scatter_(-1, ax.argmax(-1, keepdim=True), 1.0) * torch.sign(p)
    rxy = (p[..., 0:2] * p[..., 0:2]).sum(-1, keepdim=True).sqrt()
    cap = ax[..., 2:3] > rxy  # nearer to a cap plane than to the side
    cap_normal = p.new_tensor([0.0, 0.0, 1.0]) * torch.sign(p[..., 2:3])
    cyl = torch.where(cap, cap_normal, p * p.new_tensor([1.0, 1.0, 0.0]))
    k = kind[..., None]
    return torch.where(k == ELLIPSOID, p, torch.where(k == BOX, box, cyl))


def _texture_mix(texture: Tensor, frequency: Tensor, p: Tensor) -> Tensor:
    """Weight of ``colour_b`` in ``[0, 1]`` at local point ``p``: soft stripes, 3D checker or rings."""
    w = 2.0 * math.pi * frequency[..., None] * p  # [..., 3]
    stripes = torch.sin(w[..., 2])
    checker = torch.sin(0.5 * w).prod(-1) * 4.0
    rings = torch.sin(2.0 * math.pi * frequency * p[..., 0:2].square().sum(-1).sqrt())
    s = torch.where(texture == STRIPES, stripes, torch.where(texture == CHECKER, checker, rings))
    return (0.5 + 2.0 * s).clamp(0.0, 1.0)


def _light_dirs(device: torch.device) -> Tensor:
    return F.normalize(torch.tensor(LIGHT_DIRS, dtype=torch.float32, device=device), dim=-1)


def _render(
    scenes: SceneBatch, cameras: Cameras, size: int, supersample: int, lights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Render ``[B, V, 3, S, S]`` and the foreground coverage ``[B, V, S, S]`` (fraction of sub-samples hit).

    ``lights [B, L, 3]`` are unit world directions (default :data:`LIGHT_DIRS` for every scene).
    """
    if size < 1 or supersample < 1:
        raise ValueError(f"need size >= 1 and supersample >= 1, got {size} and {supersample}")
    device = scenes.device
    cameras = cameras.to(device)
    bsz, k, v = len(scenes), scenes.max_primitives, len(cameras)
    s_hi = size * supersample
    if lights is None:
        lights = _light_dirs(device).expand(bsz, -1, -1)
    weights = torch.tensor(LIGHT_WEIGHTS, dtype=torch.float32, device=device)

    _, dirs = cameras.rays(s_hi)
    dirs = dirs.reshape(v, s_hi * s_hi, 3).to(torch.float32)  # [V, R, 3]
    centres = cameras.centers.to(torch.float32)  # [V, 3]
    w2l = scenes.world_to_local.reshape(bsz * k, 3, 4)
    a_mat, b_vec = w2l[:, :, :3], w2l[:, :, 3]
    o_local = _lin(a_mat[:, None], centres[None]) + b_vec[:, None]  # [P, V, 3]
    kinds = torch.where(scenes.active, scenes.kind, torch.full_like(scenes.kind, -1)).reshape(-1)
    groups = [(kd, (kinds == kd).nonzero().squeeze(1)) for kd in range(len(PRIMITIVE_KINDS))]

    # Per-primitive attributes gathered once per ray after the nearest hit is known.
    attrs = torch.cat(
        [
            scenes.world_to_local.reshape(bsz, k, 12),
            scenes.kind[..., None].to(torch.float32),
            scenes.colour_a,
            scenes.colour_b,
            scenes.texture[..., None].to(torch.float32),
            scenes.frequency[..., None],
        ],
        dim=-1,
    )  # [B, K, 21]

    rays = dirs.shape[1]
    chunk = max(256, _MAX_PAIRS // max(1, bsz * k * v))
    colours, hits = [], []
    for start in range(0, rays, chunk):  # one pass unless memory needs more
        d_world = dirs[:, start : start + chunk]  # [V, r, 3]
        r = d_world.shape[1]
        t_all = torch.full((bsz * k, v, r), math.inf, device=device)
        for kd, idx in groups:
            if idx.numel() == 0:
                continue
            d_local = _lin(a_mat[idx][:, None, None], d_world[None])  # [P_k, V, r, 3]
            t_all[idx] = _intersect(kd, o_local[idx][:, :, None], d_local)
        t_min, nearest = t_all.reshape(bsz, k, v, r).min(dim=1)  # [B, V, r]
        hit = torch.isfinite(t_min)
        t_hit = torch.where(hit, t_min, torch.zeros_like(t_min))
        at = torch.gather(attrs, 1, nearest.reshape(bsz, v * r, 1).expand(-1, -1, attrs.shape[-1]))
        at = at.reshape(bsz, v, r, -1)
        m = at[..., 0:12].reshape(bsz, v, r, 3, 4)
        p_world = centres[None, :, None] + t_hit[..., None] * d_world[None]  # [B, V, r, 3]
        p_local = _lin(m[..., :3], p_world) + m[..., 3]
        kind = at[..., 12].round().long()
        n_world = F.normalize(_lin_t(m[..., :3], _local_normal(kind, p_local)), dim=-1)
        lambert = (n_world[:, :, :, None, :] * lights[:, None, None]).sum(-1).clamp_min(0.0)  # [B, V, r, L]
        shade = AMBIENT + (lambert * weights).sum(-1)
        mix = _texture_mix(at[..., 19].round().long(), at[..., 20], p_local)[..., None]
        albedo = at[..., 13:16] * (1.0 - mix) + at[..., 16:19] * mix
        rgb = torch.where(hit[..., None], (albedo * shade[..., None]).clamp(0.0, 1.0), torch.ones_like(albedo))
        colours.append(rgb)
        hits.append(hit)

    rgb = torch.cat(colours, dim=2).reshape(bsz * v, s_hi, s_hi, 3).permute(0, 3, 1, 2)
    cov = torch.cat(hits, dim=2).reshape(bsz * v, 1, s_hi, s_hi).to(torch.float32)
    if supersample > 1:
        rgb = F.avg_pool2d(rgb, supersample)
        cov = F.avg_pool2d(cov, supersample)
    return rgb.reshape(bsz, v, 3, size, size).contiguous(), cov.reshape(bsz, v, size, size)


def render_scenes(scenes: SceneBatch, cameras: Cameras, size: int, *, supersample: int = 2) -> Tensor:
    """Render every scene from every camera: ``[B, V, 3, size, size]`` in ``[0, 1]`` on white.

    Analytic ray casting (nearest hit over primitives), Lambertian shading from
    fixed world lights plus ambient, texture colour at the hit point. The shading
    is view-independent, so the views are exactly 3D-consistent. Antialiasing:
    ``supersample x supersample`` rays per pixel (a regular sub-grid, i.e. a render
    at ``size * supersample`` box-filtered down); pixels no ray hits are exactly 1.0.
    """
    return _render(scenes, cameras, size, supersample)[0]


def make_grids(
    n: int,
    seed: int,
    *,
    layout: GridLayout = INSTANT3D_2X2,
    view_size: int = 64,
    radius: float = 2.7,
    fov_deg: float = 50.0,
    max_primitives: int = 4,
) -> Tensor:
    """``n`` perfectly consistent random grids ``[n, 3, rows*view_size, cols*view_size]`` for ``layout``."""
    cams = layout.cameras(radius=radius, fov_deg=fov_deg)
    views = render_scenes(random_scenes(n, seed, max_primitives), cams, view_size)
    return join_grid(views, layout)


# --------------------------------------------------------------------------- controlled inconsistency


def _rgb_hue_shift(rgb: Tensor, degrees: Tensor) -> Tensor:
    """Rotate the HSV hue of ``rgb [B, 3, H, W]`` by ``degrees [B]`` (saturation and value kept, so in gamut)."""
    r, g, b = rgb.unbind(1)
    maxc, argmax = rgb.max(dim=1)
    delta = maxc - rgb.amin(dim=1)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(
        argmax == 0, ((g - b) / safe) % 6.0, torch.where(argmax == 1, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )  # sextants
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    hue = (hue + degrees[:, None, None] / 60.0) / 6.0
    return _hsv_to_rgb(hue, sat, maxc).permute(0, 3, 1, 2)


def _patch_weights(coverage: Tensor, level: Tensor) -> Tensor:
    """Per-pixel area fraction ``[B, S, S]`` of a square, centred on the foreground bounding box,
    whose area is ``level`` x the box's area (exact box-filter coverage, so it grows smoothly)."""
    size = coverage.shape[-1]
    fg = coverage > 0
    idx = torch.arange(size, device=coverage.device, dtype=torch.float32)
    cols, rows = fg.any(dim=1), fg.any(dim=2)  # [B, S]
    empty = ~cols.any(dim=1)

    def extent(mask: Tensor) -> tuple[Tensor, Tensor]:
        lo = torch.where(mask, idx, torch.full_like(idx, float(size))).amin(dim=1)
        hi = torch.where(mask, idx + 1.0, torch.zeros_like(idx)).amax(dim=1)
        return lo, hi

    x0, x1 = extent(cols)
    y0, y1 = extent(rows)
    area = torch.where(empty, torch.zeros_like(x0), (x1 - x0) * (y1 - y0))
    half = 0.5 * (level * area).sqrt()
    cx = torch.where(empty, torch.full_like(x0, size / 2), 0.5 * (x0 + x1))
    cy = torch.where(empty, torch.full_like(y0, size / 2), 0.5 * (y0 + y1))

    def overlap(c: Tensor) -> Tensor:
        lo, hi = (c - half)[:, None], (c + half)[:, None]
        return (torch.minimum(idx + 1.0, hi) - torch.maximum(idx, lo)).clamp(0.0, 1.0)  # [B, S]

    return overlap(cy)[:, :, None] * overlap(cx)[:, None, :]


def inconsistent_views(
    scenes: SceneBatch,
    cameras: Cameras,
    size: int,
    kind: str,
    level: float | Tensor,
    view: int = 1,
    seed: int = 0,
    *,
    supersample: int = 2,
) -> Tensor:
    """Clean renders with view ``view`` made inconsistent by ``level`` in ``[0, 1]`` (scalar or ``[B]``).

    Mirrors the paper's Sec. 3.3 experiment. ``level = 0`` returns exactly
    :func:`render_scenes`; only view ``view`` changes, and more with a higher level:

    * ``"patch"``: a square centred on the view's foreground bounding box, with
      ``level`` x its area, is replaced by the same pixels of a different random
      scene (deterministic from ``seed`` and the scene) seen by the same camera.
    * ``"pose"``: the object (and its lights) is rotated about world z by
      ``level * 60`` degrees, i.e. that view's camera azimuth is wrong by as much.
    * ``"colour"``: the foreground hue is rotated by ``level * 180`` degrees;
      the background stays exactly white.
    """
    if kind not in INCONSISTENCY_KINDS:
        raise ValueError(f"unknown inconsistency kind {kind!r}; expected one of {', '.join(INCONSISTENCY_KINDS)}")
    bsz, nviews = len(scenes), len(cameras)
    if not -nviews <= view < nviews:
        raise ValueError(f"view {view} out of range for {nviews} cameras")
    view %= nviews
    lv = _per_scene(level, bsz, scenes.device)
    if not bool(((lv >= 0) & (lv <= 1)).all()):
        raise ValueError(f"inconsistency level must be in [0, 1], got {level}")

    clean, coverage = _render(scenes, cameras, size, supersample)
    one_cam = Cameras(cameras.c2w[view : view + 1], cameras.fov_deg)
    target, cov = clean[:, view], coverage[:, view]
    if kind == "patch":
        donors = _scenes_from_seeds(
            [_mix_seed(seed, 0x5A7C4, key) for key in _scene_keys(scenes)], scenes.max_primitives
        ).to(scenes.device)
        donor = _render(donors, one_cam, size, supersample)[0][:, 0]
        w = _patch_weights(cov, lv)[:, None]
        changed = target * (1.0 - w) + donor * w
    elif kind == "pose":
        degrees = lv * POSE_MAX_DEG
        lights = torch.einsum("bij,lj->bli", _rot_z(degrees).to(scenes.device), _light_dirs(scenes.device))
        changed = _render(scenes.rotated_z(degrees), one_cam, size, supersample, lights)[0][:, 0]
    else:  # colour
        shifted = _rgb_hue_shift(target, lv * HUE_MAX_DEG).clamp(0.0, 1.0)
        changed = torch.where(cov[:, None] > 0, shifted, target)

    out = clean.clone()
    out[:, view] = torch.where((lv > 0)[:, None, None, None], changed, target)
    return out
