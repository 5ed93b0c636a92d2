"""What one round reports: its samples' statistics, its update's, and the epoch's record built from them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class RoundStats:
    """The round's samples, all processes together (invalid samples are left out of the reward's)."""

    reward_mean: float
    reward_std: float
    mrc_mean: float
    kl_mean: float
    invalid: int

    @staticmethod
    def of(reward: Tensor, valid: Tensor, kl: Tensor) -> RoundStats:
        ok = reward[valid]
        return RoundStats(
            reward_mean=float(ok.mean()) if ok.numel() else math.nan,
            reward_std=float(ok.std(unbiased=False)) if ok.numel() else math.nan,
            mrc_mean=float(-ok.mean()) if ok.numel() else math.nan,
            kl_mean=float(kl.mean()),
            invalid=int((~valid).sum()),
        )


@dataclass(frozen=True)
class UpdateStats:
    """The round's update (the defaults: a round that made none)."""

    loss: float = math.nan  # the whole round's, all processes together
    grad_norm: float = math.nan  # the mean over the optimiser steps, before clipping
    optimizer_steps: int = 0
    skipped_steps: int = 0  # backward passes with a non-finite loss, and steps with a non-finite gradient


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    samples: RoundStats
    update: UpdateStats
    reward_wait_s: float  # the time the round waited for rewards after sampling
    samples_per_s: float
    updated: bool

    def record(self) -> dict[str, Any]:
        """The epoch's line of ``metrics.jsonl`` (its ``eval_*`` fields None until an evaluation fills them)."""
        return {
            "epoch": self.epoch,
            **asdict(self.samples),
            **asdict(self.update),
            "reward_wait_s": self.reward_wait_s,
            "samples_per_s": self.samples_per_s,
            "updated": self.updated,
            **dict.fromkeys(EVAL_FIELDS),
        }


#: An evaluation's fields in a metrics record (see :meth:`.evaluation.Evaluation.record`).
EVAL_FIELDS = ("eval_mrc", "eval_kl", "eval_invalid", "eval_mrc_se", "eval_alignment", "eval_diversity")
