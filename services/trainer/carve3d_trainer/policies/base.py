"""A diffusion model as an RL policy: sample with per-step log-probs, re-score stored steps.

One implementation serves every model: a policy is a denoiser (a diffusers
UNet), a prompt encoder, an optional latent decoder (a VAE) and a DDIM
schedule. Subclasses only say how prompts are encoded and latents decoded
(:mod:`.tiny` for the CPU model, :mod:`.diffusers_sd` for Stable Diffusion
pipelines), so sampling, classifier-free guidance, log-probs and the
reference model are the same code for all of them.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ddim import DDIMSchedule, ddim_step

#: Conditioning passed to the UNet: ``encoder_hidden_states`` plus model-specific extras (SDXL's
#: ``added_cond_kwargs`` as ``added.<name>``, a pooled ``class_labels``), every tensor with the batch first.
Conditioning = dict[str, Tensor]

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class Trajectory:
    """A batch of sampled denoising trajectories (everything the policy gradient needs)."""

    prompts: list[str]
    cond: Conditioning  # prompt conditioning, batch first
    uncond: Conditioning  # empty-prompt conditioning for classifier-free guidance
    latents: Tensor  # [B, T + 1, ...] x_T, ..., x_0 (float32)
    log_probs: Tensor  # [B, T] log p_theta(x_{t-1} | x_t) at sampling time (float32)
    images: Tensor  # [B, 3, H, W] in [0, 1]
    ref_log_probs: Tensor | None = None  # [B, T] the same steps under the reference model

    @staticmethod
    def concat(batches: list[Trajectory]) -> Trajectory:
        """One trajectory of several batches' samples, in order."""
        first = batches[0]
        refs = [t.ref_log_probs for t in batches if t.ref_log_probs is not None]
        return Trajectory(
            prompts=[p for t in batches for p in t.prompts],
            cond={k: torch.cat([t.cond[k] for t in batches]) for k in first.cond},
            uncond={k: torch.cat([t.uncond[k] for t in batches]) for k in first.uncond},
            latents=torch.cat([t.latents for t in batches]),
            log_probs=torch.cat([t.log_probs for t in batches]),
            images=torch.cat([t.images for t in batches]),
            ref_log_probs=torch.cat(refs) if len(refs) == len(batches) else None,  # all of them or none
        )

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return int(self.log_probs.shape[1])

    @property
    def kl(self) -> Tensor:
        """Per-sample KL estimate: mean over steps of ``log p_theta - log p_ref`` on the sampled path."""
        return self.kl_over(None)

    def kl_over(self, steps: Tensor | None) -> Tensor:
        """:attr:`kl` over the given step indices only (``None``: every step)."""
        if self.ref_log_probs is None:
            raise ValueError("the trajectory was sampled without reference log-probs")
        ratio = self.log_probs - self.ref_log_probs
        return (ratio if steps is None else ratio[:, steps.to(ratio.device)]).mean(dim=1)

    def select(self, index: Tensor | slice) -> Trajectory:
        """A sub-batch."""
        idx = index if isinstance(index, slice) else index.tolist()
        pick = (lambda t: t[index]) if isinstance(index, slice) else (lambda t: t[index.to(t.device)])
        prompts = self.prompts[idx] if isinstance(idx, slice) else [self.prompts[i] for i in idx]
        return Trajectory(
            prompts=prompts,
            cond={k: pick(v) for k, v in self.cond.items()},
            uncond={k: pick(v) for k, v in self.uncond.items()},
            latents=pick(self.latents),
            log_probs=pick(self.log_probs),
            images=pick(self.images),
            ref_log_probs=None if self.ref_log_probs is None else pick(self.ref_log_probs),
        )


@dataclass(frozen=True)
class SamplingConfig:
    num_steps: int = 20
    guidance_scale: float = 5.0
    eta: float = 1.0


class DiffusionPolicy(nn.Module, ABC):
    """Denoiser + prompt encoder + decoder + DDIM schedule (see module docstring)."""

    def __init__(
        self,
        unet: nn.Module,
        alphas_cumprod: Tensor,
        sampling: SamplingConfig,
        *,
        schedule: DDIMSchedule | None = None,
        prediction_type: str = "epsilon",
    ) -> None:
        """``schedule`` overrides the default DDIM schedule (e.g. a pipeline scheduler's own timesteps).

        ``prediction_type``: what the UNet predicts (diffusers' names): ``epsilon``, ``v_prediction``
        or ``sample`` (x0); :meth:`predict_eps` converts the guided prediction to the noise DDIM needs.
        """
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {prediction_type!r} (use one of {PREDICTION_TYPES})")
        self.prediction_type = prediction_type
        self.unet = unet
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)
        self.sampling = sampling
        if schedule is None:
            schedule = DDIMSchedule.make(alphas_cumprod, sampling.num_steps, eta=sampling.eta)
        self.schedule = schedule
        self.lora = False
        self._reference: nn.Module | None = None  # frozen copy, only for full finetuning

    # -- what subclasses provide ---------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> tuple[Conditioning, Conditioning]:
        """``(cond, uncond)`` conditioning for a batch of prompts."""

    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent (without the batch)."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Final latents -> images ``[B, 3, H, W]`` in ``[0, 1]`` (a 2x2 grid of views)."""

    # -- trainable parameters -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def core_unet(self) -> nn.Module:
        """The UNet without a distributed wrapper (for adapters and state dicts)."""
        return getattr(self.unet, "module", self.unet)

    def enable_lora(self, rank: int = 4, alpha: float | None = None, targets: tuple[str, ...] = LORA_TARGETS) -> None:
        """Freeze the UNet and add LoRA adapters (peft); the reference model is the adapters switched off."""
        from peft import LoraConfig

        self.unet.requires_grad_(False)
        config = LoraConfig(
            r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(targets)
        )
        self.unet.add_adapter(config)
        self.lora = True

    def enable_full_finetune(self) -> None:
        """Train every UNet weight; keep a frozen copy as the reference model."""
        self._reference = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self.unet.requires_grad_(True)
        self.lora = False

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only what training changes (the LoRA weights, or the whole UNet)."""
        unet = self.core_unet
        names = {n for n, p in unet.named_parameters() if p.requires_grad}
        return {n: t.detach().cpu().contiguous() for n, t in unet.state_dict().items() if n in names}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        unet = self.core_unet
        missing = {n for n, p in unet.named_parameters() if p.requires_grad} - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
        unet.load_state_dict(state, strict=False)

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The frozen base model: LoRA disabled, or the frozen copy."""
        if self.lora:
            unet = self.core_unet
            unet.disable_adapters()
            try:
                yield unet
            finally:
                unet.enable_adapters()
        elif self._reference is not None:
            yield self._reference
        else:
            yield self.unet  # nothing is trained: the policy is its own reference

    # -- the policy ----------------------------------------------------------------------------------------
    def predict_eps(self, unet: nn.Module, x_t: Tensor, step: int, cond: Conditioning, uncond: Conditioning) -> Tensor:
        """Classifier-free-guided noise prediction for all samples at one step."""
        t = self.schedule.timesteps[step].to(x_t.device)
        x_in = torch.cat([x_t, x_t])
        merged = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        kwargs = unet_kwargs(merged)
        out = unet(x_in.to(self.unet_dtype), t, **kwargs).sample.to(torch.float32)
        out_u, out_c = out.chunk(2)
        guided = out_u + self.sampling.guidance_scale * (out_c - out_u)  # linear: guide, then convert
        if self.prediction_type == "epsilon":
            return guided
        a_t = float(self.schedule.alphas_cumprod[self.schedule.timesteps[step]])
        x = x_t.to(torch.float32)
        if self.prediction_type == "v_prediction":
            return a_t**0.5 * guided + (1 - a_t) ** 0.5 * x
        return (x - a_t**0.5 * guided) / (1 - a_t) ** 0.5  # "sample": the prediction is x0

    @property
    def unet_dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        with_reference: bool = True,
        progress: bool = False,
    ) -> Trajectory:
        """Sample a batch with log-probs (and reference log-probs for the KL)."""
        device = self.device
        b = len(prompts)
        cond, uncond = self.encode_prompts(prompts)
        if noise is None:
            noise = torch.randn((b, *self.latent_shape()), generator=generator, device="cpu")
        x = noise.to(device, torch.float32)
        latents, log_probs, ref_log_probs = [x], [], []
        steps = range(len(self.schedule))
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="sampling", leave=False)
        for i in steps:
            eps = self.predict_eps(self.unet, x, i, cond, uncond)
            x_prev, logp = ddim_step(self.schedule, i, x, eps, generator=generator)
            if with_reference:
                with self.reference() as ref:
                    eps_ref = self.predict_eps(ref, x, i, cond, uncond)
                ref_log_probs.append(ddim_step(self.schedule, i, x, eps_ref, prev_sample=x_prev)[1])
            latents.append(x_prev)
            log_probs.append(logp)
            x = x_prev
        images = self.decode(x).clamp(0, 1).to(torch.float32)
        return Trajectory(
            prompts=list(prompts),
            cond=cond,
            uncond=uncond,
            latents=torch.stack(latents, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            images=images,
            ref_log_probs=torch.stack(ref_log_probs, dim=1) if with_reference else None,
        )

    def step_log_prob(self, traj: Trajectory, step: int) -> Tensor:
        """``log p_theta(x_{t-1} | x_t)`` of the stored step under the current weights (with grad)."""
        x_t = traj.latents[:, step].to(self.device)
        x_prev = traj.latents[:, step + 1].to(self.device)
        eps = self.predict_eps(self.unet, x_t, step, traj.cond, traj.uncond)
        return ddim_step(self.schedule, step, x_t, eps, prev_sample=x_prev)[1]


def unet_kwargs(cond: Conditioning) -> dict[str, object]:
    """The keyword arguments of a diffusers UNet's ``forward`` for ``cond``."""
    kwargs: dict[str, object] = {"encoder_hidden_states": cond["encoder_hidden_states"]}
    if "class_labels" in cond:
        kwargs["class_labels"] = cond["class_labels"]
    added = {k.removeprefix("added."): v for k, v in cond.items() if k.startswith("added.")}
    if added:
        kwargs["added_cond_kwargs"] = added
    return kwargs
