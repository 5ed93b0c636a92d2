"""Hyper-parameters of the sparse-view LRM, and the named presets.

One frozen dataclass describes a whole model: the camera-modulated ViT image
encoder, the triplane transformer, the triplane renderer and where published
weights for it live. The two public presets reproduce the InstantMesh NeRF
configurations (``configs/instant-nerf-{large,base}.yaml`` in
``TencentARC/InstantMesh``) with the DINO ViT-B/16 hyper-parameters of
``facebook/dino-vitb16``; ``tiny`` is a few-thousand-parameter model of the
same shape family for tests and CPU benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import ConfigError


@dataclass(frozen=True)
class HubFile:
    """A published checkpoint on the Hugging Face Hub, pinned by content."""

    repo_id: str
    filename: str
    sha256: str  # of the whole file (the Hub's LFS object id)
    size_bytes: int
    license: str = "Apache-2.0"


@dataclass(frozen=True)
class LRMConfig:
    """Everything that fixes the model's parameter shapes and its rendering."""

    name: str = "custom"

    # -- image encoder: ViT with adaLN-style camera modulation in every block ----------------------------------------
    encoder_dim: int = 768
    encoder_layers: int = 12
    encoder_heads: int = 12
    encoder_mlp_dim: int = 3072
    patch_size: int = 16
    #: Side of the image the positional table was trained for (224 -> 14x14 patches + CLS).
    encoder_table_size: int = 224
    encoder_ln_eps: float = 1e-12
    #: Per-channel normalisation applied to [0, 1] images (DINO ViT-B/16's image processor: 0.5 / 0.5).
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    #: Camera vector length: c2w[:3, :4] row-major (12) + (fx, fy, cx, cy) normalised by the image size.
    camera_dim: int = 16
    #: Side the input views are resized to before encoding (InstantMesh was trained at 320).
    input_size: int = 320

    # -- triplane transformer --------------------------------------------------------------------------------------
    decoder_dim: int = 1024
    decoder_layers: int = 16
    decoder_heads: int = 16
    decoder_mlp_ratio: int = 4
    #: Tokens per plane side; the transposed convolution doubles it (32 -> 64).
    triplane_tokens: int = 32
    triplane_channels: int = 80

    # -- renderer --------------------------------------------------------------------------------------------------
    mlp_hidden: int = 64
    mlp_layers: int = 4
    #: Samples per ray, half placed uniformly and half by importance.
    samples_per_ray: int = 128
    #: Half side of the reconstruction box [-box, box]^3 the planes span.
    box: float = 1.0

    hub: HubFile | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.encoder_dim % self.encoder_heads or self.decoder_dim % self.decoder_heads:
            raise ConfigError(f"LRM config {self.name!r}: widths must be divisible by the head counts")
        if self.input_size % self.patch_size or self.encoder_table_size % self.patch_size:
            raise ConfigError(f"LRM config {self.name!r}: image sizes must be multiples of the patch size")
        if self.samples_per_ray < 8 or self.samples_per_ray % 2:
            raise ConfigError(f"LRM config {self.name!r}: samples_per_ray must be even and at least 8")
        if self.mlp_layers < 2:
            raise ConfigError(f"LRM config {self.name!r}: the density/colour MLP needs at least 2 layers")

    @property
    def plane_size(self) -> int:
        """Side of each feature plane after upsampling."""
        return 2 * self.triplane_tokens

    @property
    def coarse_samples(self) -> int:
        return self.samples_per_ray // 2

    @property
    def fine_samples(self) -> int:
        return self.samples_per_ray - self.coarse_samples

    def with_overrides(self, **changes: object) -> LRMConfig:
        """A copy with some fields replaced (validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]


#: InstantMesh's published NeRF reconstructors (Hub commit 478476440a2f; sizes and sha256 from the LFS pointers).
INSTANT_NERF_LARGE = LRMConfig(
    name="instant-nerf-large",
    decoder_layers=16,
    triplane_channels=80,
    samples_per_ray=128,
    hub=HubFile(
        repo_id="TencentARC/InstantMesh",
        filename="instant_nerf_large.ckpt",
        sha256="530a344ea9b856e012492b9644ab73532ddf7c06d548f60c489e49a528322fb9",
        size_bytes=1_514_088_389,
    ),
)

INSTANT_NERF_BASE = LRMConfig(
    name="instant-nerf-base",
    decoder_layers=12,
    triplane_channels=40,
    samples_per_ray=96,
    hub=HubFile(
        repo_id="TencentARC/InstantMesh",
        filename="instant_nerf_base.ckpt",
        sha256="bcbfff8be8545f8206110f432afddedfb4311abc1146b843ab2bdb6678f8d9c9",
        size_bytes=1_253_151_890,
    ),
)

#: A miniature of the same architecture: every code path, a few thousand parameters, no published weights.
TINY = LRMConfig(
    name="tiny",
    encoder_dim=32,
    encoder_layers=2,
    encoder_heads=2,
    encoder_mlp_dim=64,
    patch_size=8,
    encoder_table_size=32,
    input_size=48,
    decoder_dim=48,
    decoder_layers=2,
    decoder_heads=2,
    triplane_tokens=4,
    triplane_channels=8,
    mlp_hidden=16,
    samples_per_ray=24,
)

PRESETS: dict[str, LRMConfig] = {c.name: c for c in (INSTANT_NERF_LARGE, INSTANT_NERF_BASE, TINY)}


def get_preset(name: str) -> LRMConfig:
    """The preset called ``name``; unknown -> :class:`ConfigError` listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown LRM preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
