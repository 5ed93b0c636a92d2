"""DDIM sampling steps with the log-probability of the step taken (the policy of the RL MDP).

With ``eta = 1`` each DDIM step is a Gaussian ``N(mu_theta(x_t), sigma_t^2 I)``;
the RL objective needs ``log p(x_{t-1} | x_t)`` of the sampled ``x_{t-1}``
under that Gaussian, both while sampling and when re-scoring a stored
trajectory with new parameters. Always computed in float32: the difference of
two log-probs of nearly equal policies is tiny and fp16 loses it.

Conventions (DDPO, Black et al. 2023, as in ddpo-pytorch's
``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py``; the Carve3D paper, Sec. 4,
finetunes with the same policy):

* ``x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``
* ``sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))``
* ``mu = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) eps``
* ``log p`` is the **mean** over non-batch elements of the Gaussian log density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DDIMSchedule:
    """The timesteps of one sampling run and the cumulative alphas they index.

    ``timesteps`` are in sampling order (descending); step ``i`` goes from
    ``timesteps[i]`` to ``timesteps[i + 1]`` (or to the final alpha).
    """

    alphas_cumprod: Tensor  # [num_train_timesteps] float64
    timesteps: Tensor  # [T] int64, descending
    final_alpha_cumprod: float
    eta: float = 1.0

    @staticmethod
    def make(
        alphas_cumprod: Tensor, num_steps: int, *, eta: float = 1.0, set_alpha_to_one: bool = False, offset: int = 1
    ) -> DDIMSchedule:
        """Evenly spaced ("leading") timesteps shifted by ``offset``, like Stable Diffusion's DDIM config.

        The offset keeps the last step away from ``t = 0``, where ``a_t`` equals
        the final alpha and the step's variance (hence its log-prob) vanishes.
        """
        n = alphas_cumprod.shape[0]
        if not 1 <= num_steps <= n:
            raise ValueError(f"num_steps must be in [1, {n}], got {num_steps}")
        ratio = n // num_steps
        timesteps = (torch.arange(num_steps, dtype=torch.int64) * ratio).flip(0) + offset
        final = 1.0 if set_alpha_to_one else float(alphas_cumprod[0])
        return DDIMSchedule(alphas_cumprod.to(torch.float64), timesteps, final, eta)

    @staticmethod
    def from_diffusers(scheduler: object, num_steps: int, *, eta: float = 1.0) -> DDIMSchedule:
        """The schedule a diffusers ``DDIMScheduler`` would use for ``num_steps``."""
        scheduler.set_timesteps(num_steps)  # type: ignore[attr-defined]
        cfg = scheduler.config  # type: ignore[attr-defined]
        final = 1.0 if cfg.set_alpha_to_one else float(scheduler.alphas_cumprod[0])  # type: ignore[attr-defined]
        return DDIMSchedule(
            scheduler.alphas_cumprod.to(torch.float64),  # type: ignore[attr-defined]
            scheduler.timesteps.to(torch.int64).clone(),  # type: ignore[attr-defined]
            final,
            eta,
        )

    @staticmethod
    def linear_betas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        return torch.cumprod(1.0 - betas, dim=0)

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def sigmas(self) -> Tensor:
        """``[T]`` the standard deviation of every step (float64), as :func:`ddim_step` uses it."""
        a_t, a_prev = self.alphas(torch.arange(len(self)))
        return self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp_min(0).sqrt()

    def alphas(self, step: Tensor) -> tuple[Tensor, Tensor]:
        """``(a_t, a_prev)`` for step indices ``step [B]`` (float64)."""
        step = step.to(torch.int64).cpu()
        t = self.timesteps[step]
        a_t = self.alphas_cumprod[t]
        nxt = (step + 1).clamp_max(len(self) - 1)
        a_prev = torch.where(
            step + 1 < len(self), self.alphas_cumprod[self.timesteps[nxt]], torch.tensor(self.final_alpha_cumprod)
        )
        return a_t, a_prev


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


def ddim_mean(schedule: DDIMSchedule, step: int | Tensor, x_t: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """The Gaussian of one DDIM step: ``(mu, sigma)``, float32, ``sigma`` broadcastable against ``x_t``.

    Differentiable in ``eps``: :func:`ddim_step` builds on it, and so can a
    reparameterised sampler (``x_prev = mu + sigma z``) that backpropagates
    through the chain.
    """
    b = x_t.shape[0]
    step_t = torch.full((b,), int(step)) if isinstance(step, int) else step.reshape(-1).expand(b)
    a_t, a_prev = schedule.alphas(step_t)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    sigma = schedule.eta * var.clamp_min(0).sqrt()
    x_t32, eps32 = x_t.to(torch.float32), eps.to(torch.float32)
    a_t_, a_prev_, sigma_ = _bcast(a_t, x_t32), _bcast(a_prev, x_t32), _bcast(sigma, x_t32)
    x0_hat = (x_t32 - (1 - a_t_).sqrt() * eps32) / a_t_.sqrt()
    direction = (1 - a_prev_ - sigma_**2).clamp_min(0).sqrt() * eps32
    return a_prev_.sqrt() * x0_hat + direction, sigma_


def ddim_step(
    schedule: DDIMSchedule,
    step: int | Tensor,
    x_t: Tensor,
    eps: Tensor,
    *,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step: returns ``(x_prev, log_prob [B])``.

    With ``prev_sample`` the step is not sampled but re-scored: the log-prob
    of that given ``x_prev`` under the current ``eps`` (the RL training pass).
    ``step`` is the index into ``schedule.timesteps`` (an int, or ``[B]``).
    """
    mean, sigma = ddim_mean(schedule, step, x_t, eps)
    if prev_sample is None:
        if (sigma == 0).any():
            raise ValueError(
                "this step has zero variance (eta = 0, or a final step at t = 0): it has no log-prob; use eta > 0 "
                "and a timestep offset"
            )
        noise = torch.randn(mean.shape, generator=generator, device="cpu" if generator is None else generator.device)
        prev_sample = mean + sigma * noise.to(mean.device)
    prev32 = prev_sample.to(torch.float32).detach()
    log_prob = -((prev32 - mean) ** 2) / (2 * sigma**2) - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    return prev32, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
