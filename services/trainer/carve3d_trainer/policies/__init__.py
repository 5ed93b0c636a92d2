"""Diffusion policies behind one interface (:class:`DiffusionPolicy`)."""

from __future__ import annotations

import torch

from carve3d_reward.errors import ConfigError

from ..config import PolicyConfig
from .base import Conditioning, DiffusionPolicy, SamplingConfig, Trajectory


def build_policy(config: PolicyConfig, *, seed: int = 0) -> DiffusionPolicy:
    """The policy named by ``config``, with LoRA or full finetuning set up (``seed``: a tiny model's random init)."""
    sampling = SamplingConfig(num_steps=config.num_steps, guidance_scale=config.guidance_scale, eta=config.eta)
    if config.kind == "tiny":
        if config.mixed_precision != "no":
            raise ConfigError("policy.mixed_precision applies to sd/sdxl; the tiny CPU model runs in fp32")
        from .tiny import TinyConfig, TinyGridPolicy

        if config.path:  # a folder or builtin:<name>
            policy: DiffusionPolicy = TinyGridPolicy.from_pretrained(config.path, sampling=sampling)
        else:
            torch.manual_seed(seed)
            policy = TinyGridPolicy(TinyConfig(sampling=sampling))
    else:
        from .diffusers_sd import build_pipeline_policy

        if not config.path:
            raise ConfigError(f"policy.kind {config.kind!r} needs policy.path (a local folder or a hub id)")
        dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
        policy = build_pipeline_policy(config.kind, config.path, sampling=sampling, dtype=dtype)
    if config.lora_rank > 0:
        policy.enable_lora(config.lora_rank, targets=tuple(config.lora_targets))
    else:
        policy.enable_full_finetune()
    return policy


__all__ = ["Conditioning", "DiffusionPolicy", "SamplingConfig", "Trajectory", "build_policy"]
