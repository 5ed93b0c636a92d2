"""The metric's settings: one typed object, read from ``MRC_*`` environment
variables and overridable from the CLI.

Everything that changes a score is a field here and goes into the metric id
(:func:`MetricSettings.metric_id`); things that only change where or how fast
it runs (device, chunk sizes) do not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from . import __version__

ReconstructorName = Literal["carve", "lrm"]
LRMPresetName = Literal["instant-nerf-large", "instant-nerf-base", "tiny"]
LRMDType = Literal["fp32", "bf16", "fp16"]
DistanceName = Literal["l1", "ssim", "lpips-alex", "lpips-vgg"]

#: Fields that do not change the score and are left out of the metric id.
_RUNTIME_FIELDS = frozenset(
    {
        "device",
        "chunk_rays",
        "lpips_trunk_path",
        "lpips_trunk_sha256",
        # LRM: where the weights are and how fast they run; the weights themselves enter the metric id through
        # the reconstructor's fingerprint (their sha256).
        "lrm_checkpoint",
        "lrm_checkpoint_sha256",
        "lrm_cache_dir",
        "lrm_download",
        "lrm_chunk_rays",
        "lrm_compile",
    }
)
#: Prefix of the fields that only matter to the ``lrm`` reconstructor (left out of other reconstructors' ids).
_LRM_PREFIX = "lrm_"


class MetricSettings(BaseSettings):
    """Settings of the MRC metric (env prefix ``MRC_``)."""

    model_config = SettingsConfigDict(env_prefix="MRC_", extra="ignore", frozen=True)

    reconstructor: ReconstructorName = Field("carve", description="Reconstruction model.")
    distance: DistanceName = Field("l1", description="Image distance between input and re-render crops.")
    layout: str = Field("2x2", description="Grid layout (tiles and their cameras).")
    azimuth0_deg: float = Field(0.0, description="Azimuth of the first tile's camera.")
    fov_deg: float = Field(50.0, gt=1.0, lt=179.0, description="Field of view of one view.")
    radius: float = Field(2.7, gt=0.0, description="Camera distance from the object centre.")
    view_size: int | None = Field(
        128, ge=16, le=2048, description="Working resolution of a view (None: the input's own)."
    )
    fg_threshold: float = Field(0.95, gt=0.0, le=1.0, description="A pixel is foreground if any channel is below.")
    bbox_pad: int = Field(5, ge=0, le=64, description="Pixels added on every side of the square box.")
    carve_resolution: int = Field(64, ge=8, le=256, description="Voxels per side of the carving grid.")
    carve_samples: int = Field(128, ge=8, le=1024, description="Samples per ray when ray-marching the hull.")
    device: str = Field("cpu", description="torch device for the model ('cpu', 'cuda', 'cuda:1').")
    chunk_rays: int = Field(1 << 18, ge=1024, description="Rays ray-marched at once (bounds memory).")
    lpips_trunk_path: Path | None = Field(
        None, description="LPIPS trunk weights file (default: the torchvision file in the torch cache)."
    )
    lpips_trunk_sha256: str | None = Field(None, description="Expected sha256 of lpips_trunk_path.")
    lrm_preset: LRMPresetName = Field("instant-nerf-large", description="LRM architecture and published weights.")
    lrm_checkpoint: Path | None = Field(
        None, description="LRM weights file, .ckpt or .safetensors (unset: the preset's file in the HF cache)."
    )
    lrm_checkpoint_sha256: str | None = Field(None, description="Expected sha256 (or prefix) of lrm_checkpoint.")
    lrm_cache_dir: Path | None = Field(None, description="Hugging Face cache for LRM weights (unset: HF_HUB_CACHE).")
    lrm_download: bool = Field(False, description="Download missing published LRM weights on first use.")
    lrm_dtype: LRMDType = Field("fp32", description="Autocast dtype of the LRM encoder/transformer (bf16 on GPUs).")
    lrm_radius: float | None = Field(
        None, gt=0.0, description="Camera distance given to the LRM (unset: --radius, the grid cameras' own)."
    )
    lrm_render_size: int | None = Field(
        None, ge=16, le=2048, description="LRM render size before resizing to the view size (unset: the view size)."
    )
    lrm_samples_per_ray: int | None = Field(
        None, ge=8, le=1024, description="LRM samples per ray, half importance-placed (unset: the preset's)."
    )
    lrm_chunk_rays: int = Field(1 << 13, ge=64, description="LRM rays x grids rendered at once (bounds memory).")
    lrm_compile: bool = Field(False, description="torch.compile the LRM encoder and transformer.")

    def score_fields(self) -> dict[str, object]:
        """The fields that change a score, as JSON-able values."""
        lrm = self.reconstructor == "lrm"
        return {
            k: v
            for k, v in self.model_dump(mode="json").items()
            if k not in _RUNTIME_FIELDS and (lrm or not k.startswith(_LRM_PREFIX))
        }

    def settings_hash(self) -> str:
        blob = json.dumps(self.score_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:8]

    def metric_id(self, model_fingerprint: str = "") -> str:
        """A string that differs whenever scores are not comparable.

        ``mrc/<reconstructor>+<distance>/v<version>/<settings hash>[/<weights hash>]``.
        """
        mid = f"mrc/{self.reconstructor}+{self.distance}/v{__version__}/{self.settings_hash()}"
        return f"{mid}/{model_fingerprint}" if model_fingerprint else mid
