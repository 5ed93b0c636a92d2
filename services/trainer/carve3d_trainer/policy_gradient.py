"""The policy-gradient update's two halves: the loss of one backward pass, and the optimiser step around it.

The loss is DDPO's (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning", Sec. 4;
ddpo-pytorch's ``train.py``): REINFORCE on the step log-probs (DDPO-SF, the one the Carve3D paper trains
with, Sec. 4) or the PPO-clipped importance ratio (DDPO-IS). :class:`OptimiserStep` accumulates backward
passes into optimiser steps with gradient-norm clipping, and skips what is not finite instead of
poisoning the run, in step on every process.
"""

from __future__ import annotations

import logging
import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
from accelerate import Accelerator
from torch import Tensor

from .policies.base import DiffusionPolicy
from .stats import UpdateStats

log = logging.getLogger("carve3d_trainer")


def policy_loss(
    log_prob: Tensor,
    advantages: Tensor,
    *,
    method: Literal["reinforce", "ppo"],
    sampled_log_prob: Tensor,
    ppo_clip: float,
) -> Tensor:
    """The mean over a minibatch at one timestep of ``-A log p`` (REINFORCE) or of PPO's clipped surrogate.

    ``sampled_log_prob`` (PPO only): the same step's log-prob under the weights that sampled it.
    """
    if method == "ppo":
        ratio = torch.exp(log_prob - sampled_log_prob.to(log_prob.device))
        clipped = torch.clamp(ratio, 1 - ppo_clip, 1 + ppo_clip)
        return torch.maximum(-advantages * ratio, -advantages * clipped).mean()
    return -(advantages * log_prob).mean()


def share_of_step(loss: Tensor, *, samples: int, step_samples: int, timesteps: int) -> Tensor:
    """A minibatch's mean loss at one timestep as its share of the optimiser step's loss.

    The step's loss is the mean over its ``step_samples`` samples and over the ``timesteps`` trained per
    sample, so the step's size depends neither on ``train_batch_size`` nor on ``timestep_fraction``.
    """
    return loss * samples / step_samples / timesteps


class OptimiserStep:
    """Backward passes accumulated into optimiser steps, over one round's update.

    Clips the gradient norm before each step. A backward pass whose loss is not finite on some process is
    skipped by every process (one skipping alone would pair its next gradient all-reduce with another
    process's current one, and hang the run), and so is a step whose gradient is not finite; both count
    as skipped. ``timesteps``: the trained timesteps per sample (the logged loss is summed over them).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        optimizer: torch.optim.Optimizer,
        policy: DiffusionPolicy,
        max_grad_norm: float,
        timesteps: int,
        *,
        label: str,
    ) -> None:
        self.acc = accelerator
        self.optimizer = optimizer
        self.model = policy.unet  # DDP-wrapped under several processes
        self.parameters = policy.trainable_parameters()
        self.max_grad_norm = max_grad_norm
        self.timesteps = timesteps
        self.label = label
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.steps = 0
        self.skipped = 0
        self._backwards = 0  # since the last optimiser step
        self._sync = True

    def backward_pass(self, *, sync: bool) -> AbstractContextManager[Any]:
        """The context of one pass's forward and :meth:`backward` (one minibatch at one timestep).

        Under DDP only a ``sync`` pass, the last before an optimiser step, all-reduces the gradients; the
        others accumulate locally (forward and backward both inside ``no_sync``).
        """
        self._sync = sync
        return nullcontext() if sync else self.acc.no_sync(self.model)

    def backward(self, loss: Tensor) -> None:
        """Accumulate ``loss``'s gradients, unless it is not finite on some process (then every process skips)."""
        if not self._finite_everywhere(loss):
            self.skipped += 1
            log.warning("non-finite loss at %s: this backward pass is skipped", self.label)
            if self._sync and self.acc.num_processes > 1:
                # DDP's forward prepared this pass to all-reduce: a zero loss that reaches every trainable
                # tensor lets it do so (over the gradients accumulated so far) instead of leaving the
                # reducer expecting a backward pass that never comes.
                self.acc.backward(sum((p * 0.0).sum() for p in self.parameters))
            return
        self.acc.backward(loss)
        self._backwards += 1
        self.losses.append(float(loss.detach()) * self.timesteps)

    def step(self) -> None:
        """Clip and apply the accumulated gradient (unless it is not finite), then clear it."""
        norm = self.acc.clip_grad_norm_(self.parameters, self.max_grad_norm)
        norm_f = float(norm) if norm is not None and self._backwards else math.nan
        if math.isfinite(norm_f):
            self.optimizer.step()
            self.steps += 1
            self.norms.append(norm_f)
        else:
            self.skipped += 1
            log.warning("non-finite gradient at %s: the optimiser step is skipped", self.label)
        self.optimizer.zero_grad(set_to_none=True)
        self._backwards = 0

    def stats(self) -> UpdateStats:
        """The update's numbers; the loss is the whole round's, over every process's passes."""
        loss_sum = torch.tensor([sum(self.losses), len(self.losses)], dtype=torch.float64)
        if self.acc.num_processes > 1:
            loss_sum = self.acc.reduce(loss_sum.to(self.acc.device), reduction="sum").cpu()
        return UpdateStats(
            loss=float(loss_sum[0] / loss_sum[1].clamp_min(1)),
            grad_norm=sum(self.norms) / len(self.norms) if self.norms else math.nan,
            optimizer_steps=self.steps,
            skipped_steps=self.skipped,
        )

    def _finite_everywhere(self, loss: Tensor) -> bool:
        finite = bool(torch.isfinite(loss.detach()).all())
        if self.acc.num_processes == 1:
            return finite
        bad = torch.tensor([0.0 if finite else 1.0], device=self.acc.device)
        return float(self.acc.reduce(bad, reduction="sum")) == 0.0
