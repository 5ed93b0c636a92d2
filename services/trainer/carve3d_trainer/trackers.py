"""Per-prompt statistics: normalise rewards and KLs against each prompt's own history.

A prompt's samples are compared with that prompt's recent samples (a ring
buffer of ``buffer_size`` values per prompt), so easy and hard prompts
contribute equally; until a prompt has ``min_count`` values (and at least two:
one value has no spread) the whole batch's statistics stand in. Held as
tensors and updated with scatter operations (no Python loop over samples), and
saved/restored exactly with the checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

_EPS = 1e-6


class PerPromptStatTracker:
    """Running per-prompt mean/std over the last ``buffer_size`` values."""

    def __init__(self, buffer_size: int, min_count: int) -> None:
        if buffer_size < 1 or not 1 <= min_count <= buffer_size:
            raise ValueError(f"need 1 <= min_count <= buffer_size, got {min_count} and {buffer_size}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.prompt_ids: dict[str, int] = {}
        self.values = torch.zeros(0, buffer_size, dtype=torch.float64)
        self.count = torch.zeros(0, dtype=torch.int64)
        self.pos = torch.zeros(0, dtype=torch.int64)

    def _ids(self, prompts: list[str]) -> Tensor:
        for p in prompts:
            if p not in self.prompt_ids:
                self.prompt_ids[p] = len(self.prompt_ids)
        grow = len(self.prompt_ids) - self.values.shape[0]
        if grow > 0:
            self.values = torch.cat([self.values, torch.zeros(grow, self.buffer_size, dtype=torch.float64)])
            self.count = torch.cat([self.count, torch.zeros(grow, dtype=torch.int64)])
            self.pos = torch.cat([self.pos, torch.zeros(grow, dtype=torch.int64)])
        return torch.tensor([self.prompt_ids[p] for p in prompts], dtype=torch.int64)

    def update(self, prompts: list[str], values: Tensor, valid: Tensor | None = None) -> Tensor:
        """Add this batch's values, then return them normalised (``[B]``, 0 where not ``valid``)."""
        values = values.detach().to(torch.float64).cpu().reshape(-1)
        if len(prompts) != values.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {values.shape[0]} values")
        valid = torch.ones_like(values, dtype=torch.bool) if valid is None else valid.cpu().reshape(-1).bool()
        valid = valid & torch.isfinite(values)
        ids = self._ids(prompts)
        self._insert(ids[valid], values[valid])

        filled = torch.arange(self.buffer_size)[None] < self.count[:, None]  # [P, L]
        n = filled.sum(1).clamp_min(1)
        mean = (self.values * filled).sum(1) / n
        var = (((self.values - mean[:, None]) ** 2) * filled).sum(1) / n
        std = var.sqrt()
        batch_vals = values[valid]
        if batch_vals.numel():
            b_mean, b_std = batch_vals.mean(), batch_vals.std(unbiased=False)
        else:
            b_mean, b_std = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
        enough = self.count[ids] >= max(self.min_count, 2)  # one value has no spread to normalise by
        mu = torch.where(enough, mean[ids], b_mean)
        sd = torch.where(enough, std[ids], b_std)
        adv = (values - mu) / (sd + _EPS)
        return torch.where(valid, adv, torch.zeros_like(adv))

    def _insert(self, ids: Tensor, values: Tensor) -> None:
        if ids.numel() == 0:
            return
        order = torch.argsort(ids, stable=True)
        ids, values = ids[order], values[order]
        per_prompt = torch.bincount(ids, minlength=self.values.shape[0])
        first = torch.cumsum(per_prompt, 0) - per_prompt
        rank = torch.arange(ids.numel()) - first[ids]  # position of each value within its prompt's group
        keep = rank >= per_prompt[ids] - self.buffer_size  # more than a buffer's worth: the last ones win
        slot = (self.pos[ids] + rank) % self.buffer_size
        self.values[ids[keep], slot[keep]] = values[keep]
        self.pos = (self.pos + per_prompt) % self.buffer_size
        self.count = (self.count + per_prompt).clamp_max(self.buffer_size)

    def stats(self) -> dict[str, dict[str, float]]:
        """Per-prompt count/mean/std (for logs)."""
        out = {}
        for prompt, i in self.prompt_ids.items():
            c = int(self.count[i])
            vals = self.values[i, :c] if c < self.buffer_size else self.values[i]
            out[prompt] = {
                "count": c,
                "mean": float(vals.mean()) if c else 0.0,
                "std": float(vals.std(unbiased=False)) if c else 0.0,
            }
        return out

    # -- checkpointing: tensors + JSON, no pickle ---------------------------------------------------------
    def state_tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.values": self.values, f"{prefix}.count": self.count, f"{prefix}.pos": self.pos}

    def state_meta(self) -> dict[str, Any]:
        prompts = sorted(self.prompt_ids, key=self.prompt_ids.__getitem__)
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "prompts": prompts}

    def load(self, tensors: dict[str, Tensor], prefix: str, meta: dict[str, Any]) -> None:
        if meta["buffer_size"] != self.buffer_size:
            raise ValueError(
                f"tracker buffer size changed: {meta['buffer_size']} in the checkpoint, {self.buffer_size} now"
            )
        self.prompt_ids = {p: i for i, p in enumerate(meta["prompts"])}
        self.values = tensors[f"{prefix}.values"].to(torch.float64).clone()
        self.count = tensors[f"{prefix}.count"].to(torch.int64).clone()
        self.pos = tensors[f"{prefix}.pos"].to(torch.int64).clone()

    def __repr__(self) -> str:
        n = len(self.prompt_ids)
        return f"PerPromptStatTracker(prompts={n}, buffer={self.buffer_size}, min_count={self.min_count})"


def weigh_kl_advantage(kl_adv: Tensor, kl_mean: float, budget: float | None) -> Tensor:
    """The per-prompt normalised KL advantage times ``sqrt(kl_mean / budget)``, at most 1 (``budget`` None: as is).

    Normalised per prompt, the KL advantage has unit spread however small the KL: it pulls toward the
    reference as hard at KL 1e-4 as at 1e-2. Weighted, the pull grows with the distance from the reference,
    as a KL penalty's does, and is the paper's from the budget on.
    """
    if budget is None:
        return kl_adv
    return kl_adv * math.sqrt(min(1.0, max(0.0, kl_mean) / budget))


def compose_advantages(
    reward_adv: Tensor, kl_adv: Tensor, *, alpha: float = 1.0, beta: float = 0.2, clip: float = 5.0
) -> Tensor:
    """``alpha * A_r - beta * A_KL``, clipped to ``[-clip, clip]`` (paper eq. 8)."""
    return (alpha * reward_adv - beta * kl_adv).clamp(-clip, clip)


__all__ = ["PerPromptStatTracker", "compose_advantages", "weigh_kl_advantage"]
