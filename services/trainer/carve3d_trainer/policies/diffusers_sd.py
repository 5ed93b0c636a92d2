"""Stable Diffusion (1.x / 2.x) and SDXL pipelines as RL policies.

A diffusers pipeline supplies the UNet (the policy), its text encoder(s) and
tokenizer(s) (frozen), its VAE (frozen, decoding latents to the 2x2 grid
image) and its noise schedule. Sampling, classifier-free guidance, log-probs,
LoRA and the reference model are :class:`~.base.DiffusionPolicy`'s; this
module only encodes prompts the way the pipeline does, decodes latents, and
replaces the pipeline's scheduler by a ``DDIMScheduler`` built from its config
(``eta > 0`` DDIM steps are the Gaussian policy whose log-probs we need; the
config's ``steps_offset``, ``set_alpha_to_one``, ``timestep_spacing`` and
``prediction_type`` are kept). ``v_prediction`` and ``sample`` models are
converted to epsilon after guidance (the conversion is affine, so it commutes
with classifier-free guidance). The DDIM step is never clipped or thresholded.

The UNet may run in fp16/bf16 (``dtype``); the text encoders and VAE stay in
``frozen_dtype`` (fp32 by default), and log-probs are always fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import torch
from torch import Tensor, nn

from carve3d_reward.errors import ConfigError, WeightsMissingError

from ..ddim import DDIMSchedule
from .base import LORA_TARGETS, PREDICTION_TYPES, Conditioning, DiffusionPolicy, SamplingConfig

Resolution = int | tuple[int, int]


def ddim_scheduler(scheduler: Any) -> Any:
    """The pipeline's scheduler if it is a ``DDIMScheduler``, else a ``DDIMScheduler`` from its config."""
    from diffusers import DDIMScheduler

    if isinstance(scheduler, DDIMScheduler):
        return scheduler
    return DDIMScheduler.from_config(scheduler.config)


def _looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or Path(name).expanduser().exists()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def load_pipeline(
    pipeline_class: type,
    path_or_repo_id: str | Path,
    *,
    local_files_only: bool | None = None,
    revision: str | None = None,
    variant: str | None = None,
    **kwargs: Any,
) -> Any:
    """``pipeline_class.from_pretrained`` with a one-line :class:`WeightsMissingError` when the weights are absent."""
    from huggingface_hub.errors import HFValidationError

    name = str(path_or_repo_id)
    local = Path(name).expanduser()
    if _looks_like_local_path(name) and not local.is_dir():
        raise WeightsMissingError(
            f"model folder {name} does not exist: pass a folder written by a diffusers pipeline's save_pretrained, "
            "or a Hugging Face repo id (owner/name)"
        )
    try:
        return pipeline_class.from_pretrained(
            str(local) if local.is_dir() else name,
            local_files_only=local_files_only,
            revision=revision,
            variant=variant,
            **kwargs,
        )
    except (OSError, HFValidationError) as err:
        if local.is_dir():
            raise WeightsMissingError(
                f"{name} is not a loadable {pipeline_class.__name__} folder ({_first_line(err)})"
            ) from err
        raise WeightsMissingError(
            f"cannot load {pipeline_class.__name__} weights {name!r} ({_first_line(err)}): they are not in the local "
            f"Hugging Face cache and cannot be downloaded here; run `hf download {name}` (older huggingface_hub: "
            f"`huggingface-cli download {name}`) where the hub is reachable and reuse that cache (HF_HOME), or pass "
            "a local pipeline folder"
        ) from err


def _resolution(
    resolution: Resolution | None, sampling: SamplingConfig, unet: nn.Module, scale: int
) -> tuple[int, int]:
    res = resolution if resolution is not None else getattr(sampling, "resolution", None)
    if res is None:
        size = unet.config.sample_size  # type: ignore[attr-defined]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        res = (int(h) * scale, int(w) * scale)
    h, w = (res, res) if isinstance(res, int) else (int(res[0]), int(res[1]))
    if h <= 0 or w <= 0 or h % scale or w % scale:
        raise ConfigError(f"image resolution {h}x{w} must be positive and divisible by the VAE scale factor {scale}")
    return h, w


class _PipelinePolicy(DiffusionPolicy):
    """What SD and SDXL share: scheduler, latents, VAE decoding, dtypes."""

    pipeline_class_name: ClassVar[str]
    _load_kwargs: ClassVar[dict[str, Any]] = {}
    _frozen_names: ClassVar[tuple[str, ...]] = ("vae", "text_encoder")

    def __init__(
        self,
        pipeline: Any,
        sampling: SamplingConfig,
        *,
        resolution: Resolution | None = None,
        dtype: torch.dtype = torch.float32,
        frozen_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        decode_batch_size: int = 4,
    ) -> None:
        scheduler = ddim_scheduler(pipeline.scheduler)
        pipeline.scheduler = scheduler
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"unsupported scheduler prediction_type {prediction_type!r} (use one of {PREDICTION_TYPES})"
            )
        schedule = DDIMSchedule.from_diffusers(scheduler, sampling.num_steps, eta=sampling.eta)
        _check_positive_variance(schedule)
        unet = _to(pipeline.unet, device, dtype)
        super().__init__(unet, schedule.alphas_cumprod, sampling, schedule=schedule, prediction_type=prediction_type)
        self.pipeline = pipeline
        self.vae_scale_factor = int(pipeline.vae_scale_factor)
        self.resolution = _resolution(resolution, sampling, unet, self.vae_scale_factor)
        self.decode_batch_size = decode_batch_size
        for name in self._frozen_names:
            module = getattr(pipeline, name, None)
            if module is not None:
                _to(module, device, frozen_dtype).requires_grad_(False).eval()
            setattr(self, name, module)  # registered as submodules so .to() moves them
        self.unet.eval()  # no dropout: sampling and re-scoring must see the same function

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def _pipeline_class(cls) -> type:
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        *,
        sampling: SamplingConfig,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        local_files_only: bool | None = None,
        revision: str | None = None,
        variant: str | None = None,
        resolution: Resolution | None = None,
        frozen_dtype: torch.dtype = torch.float32,
    ) -> Self:
        """Load a pipeline (a local folder, or a hub id from the cache or, when online, the hub)."""
        pipeline = load_pipeline(
            cls._pipeline_class(),
            path_or_repo_id,
            local_files_only=local_files_only,
            revision=revision,
            variant=variant,
            **cls._load_kwargs,
        )
        return cls(pipeline, sampling, resolution=resolution, dtype=dtype, frozen_dtype=frozen_dtype, device=device)

    # -- the policy ----------------------------------------------------------------------------------
    def enable_lora(self, rank: int = 4, alpha: float | None = None, targets: tuple[str, ...] = LORA_TARGETS) -> None:
        """LoRA as in the base class, with the adapter weights in fp32 even on an fp16/bf16 UNet."""
        super().enable_lora(rank=rank, alpha=alpha, targets=targets)
        for p in self.trainable_parameters():
            p.data = p.data.to(torch.float32)

    def latent_shape(self) -> tuple[int, ...]:
        h, w = self.resolution
        channels = int(self.unet.config.in_channels)  # type: ignore[attr-defined]
        return (channels, h // self.vae_scale_factor, w // self.vae_scale_factor)

    def predict_eps(self, unet: nn.Module, x_t: Tensor, step: int, cond: Conditioning, uncond: Conditioning) -> Tensor:
        dtype = self.unet_dtype
        cond = {k: v.to(self.device, dtype) for k, v in cond.items()}
        uncond = {k: v.to(self.device, dtype) for k, v in uncond.items()}
        return super().predict_eps(unet, x_t, step, cond, uncond)  # guided, converted to eps, fp32

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.vae
        vae_dtype = next(vae.parameters()).dtype
        scaling = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        images = []
        for chunk in latents.split(self.decode_batch_size):
            z = chunk.to(self.device, vae_dtype) / scaling
            if shift is not None:
                z = z + shift
            images.append(vae.decode(z).sample.to(torch.float32))
        return ((torch.cat(images) + 1.0) / 2.0).clamp(0, 1)

    def _cast(self, t: Tensor) -> Tensor:
        return t.to(self.device, self.unet_dtype)


def _to(module: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """``module.to(device, dtype)``, without diffusers' cast warning when the dtype is already right."""
    if next(module.parameters()).dtype == dtype:
        return module.to(device)
    return module.to(device=device, dtype=dtype)


def _check_positive_variance(schedule: DDIMSchedule) -> None:
    if schedule.eta <= 0:
        raise ConfigError(f"sampling eta must be > 0 for a stochastic policy with log-probs, got {schedule.eta}")
    a_t, a_prev = schedule.alphas(torch.arange(len(schedule)))
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    if not bool((var > 0).all()):
        raise ConfigError(
            "the scheduler config gives a DDIM step zero variance (its last timestep is 0: steps_offset=0 with "
            "'leading' spacing?), so that step has no log-prob; use steps_offset=1 or 'trailing' timestep_spacing"
        )


class StableDiffusionPolicy(_PipelinePolicy):
    """A ``StableDiffusionPipeline`` (SD 1.x / 2.x); the CFG negative is the empty prompt."""

    pipeline_class_name = "StableDiffusionPipeline"
    _load_kwargs: ClassVar[dict[str, Any]] = {"safety_checker": None, "requires_safety_checker": False}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[Conditioning, Conditioning]:
        cond, uncond = self.pipeline.encode_prompt(
            list(prompts), self.device, 1, True, negative_prompt=None
        )  # negative None: the empty prompt
        return {"encoder_hidden_states": self._cast(cond)}, {"encoder_hidden_states": self._cast(uncond)}


class StableDiffusionXLPolicy(_PipelinePolicy):
    """A ``StableDiffusionXLPipeline``: two text encoders, pooled text embeddings and size/crop time ids.

    The CFG negative follows the pipeline's ``force_zeros_for_empty_prompt`` (zero embeddings, as SDXL base
    was trained, when set; else the empty prompt). ``added.time_ids`` use original size = target size = the
    image resolution and crop ``(0, 0)``.
    """

    pipeline_class_name = "StableDiffusionXLPipeline"
    _load_kwargs: ClassVar[dict[str, Any]] = {"add_watermarker": False}
    _frozen_names = ("vae", "text_encoder", "text_encoder_2")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[Conditioning, Conditioning]:
        embeds, neg_embeds, pooled, neg_pooled = self.pipeline.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=None,
        )
        time_ids = self.time_ids(len(prompts), projection_dim=int(pooled.shape[-1]))
        cond = {"encoder_hidden_states": embeds, "added.text_embeds": pooled, "added.time_ids": time_ids}
        uncond = {"encoder_hidden_states": neg_embeds, "added.text_embeds": neg_pooled, "added.time_ids": time_ids}
        return {k: self._cast(v) for k, v in cond.items()}, {k: self._cast(v) for k, v in uncond.items()}

    def time_ids(self, batch: int, *, projection_dim: int) -> Tensor:
        """``[batch, 6]``: original size, crop top-left, target size (the pipeline's ``_get_add_time_ids``)."""
        size = tuple(self.resolution)
        ids = self.pipeline._get_add_time_ids(
            size, (0, 0), size, dtype=torch.float32, text_encoder_projection_dim=projection_dim
        )
        return ids.to(self.device).repeat(batch, 1)


def build_pipeline_policy(kind: Literal["sd", "sdxl"], path: str | Path, **kw: Any) -> _PipelinePolicy:
    """``StableDiffusionPolicy.from_pretrained(path, **kw)`` (``"sd"``) or the SDXL one (``"sdxl"``)."""
    classes: dict[str, type[_PipelinePolicy]] = {"sd": StableDiffusionPolicy, "sdxl": StableDiffusionXLPolicy}
    if kind not in classes:
        raise ConfigError(f"unknown policy kind {kind!r}: use one of {sorted(classes)}")
    return classes[kind].from_pretrained(path, **kw)
