"""DDIM step log-probs: DDPO's Gaussian policy step (ddpo-pytorch's ``ddim_step_with_logprob``), checked
against torch.distributions."""

import pytest
import torch
from diffusers import DDIMScheduler

from carve3d_trainer.ddim import DDIMSchedule, ddim_step


@pytest.fixture()
def schedule() -> DDIMSchedule:
    return DDIMSchedule.make(DDIMSchedule.linear_betas(), 20, eta=1.0)


def reference(schedule: DDIMSchedule, i: int, x_t: torch.Tensor, eps: torch.Tensor):
    t = int(schedule.timesteps[i])
    a_t = float(schedule.alphas_cumprod[t])
    a_prev = (
        float(schedule.alphas_cumprod[int(schedule.timesteps[i + 1])])
        if i + 1 < len(schedule)
        else schedule.final_alpha_cumprod
    )
    sigma = (((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)) ** 0.5
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    mu = a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps
    return mu, sigma


@pytest.mark.parametrize("i", [0, 7, 19])
def test_log_prob_matches_normal(schedule, i) -> None:
    g = torch.Generator().manual_seed(i)
    x_t, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    x_prev, logp = ddim_step(schedule, i, x_t, eps, generator=g)
    mu, sigma = reference(schedule, i, x_t, eps)
    expected = torch.distributions.Normal(mu, sigma).log_prob(x_prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(logp, expected, atol=1e-4, rtol=1e-5)
    assert logp.dtype == torch.float32 and logp.shape == (3,)


def test_rescoring_the_sampled_step_gives_the_same_log_prob(schedule) -> None:
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    x_prev, logp = ddim_step(schedule, 5, x_t, eps, generator=g)
    _, again = ddim_step(schedule, 5, x_t, eps, prev_sample=x_prev)
    torch.testing.assert_close(logp, again)
    # Another eps (new parameters) gives a lower likelihood of the same sample (1024 dims: the sampling
    # noise cannot make up for the shifted mean), and a gradient flows.
    eps2 = (eps + 0.3 * torch.randn(eps.shape, generator=g)).requires_grad_()
    _, other = ddim_step(schedule, 5, x_t, eps2, prev_sample=x_prev)
    assert (other < logp).all()
    other.sum().backward()
    assert eps2.grad is not None and torch.isfinite(eps2.grad).all()


def test_per_sample_steps_match_scalar_steps(schedule) -> None:
    g = torch.Generator().manual_seed(1)
    x_t, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    x_prev = torch.randn(3, 2, 4, 4, generator=g)
    steps = torch.tensor([0, 5, 19])
    _, batched = ddim_step(schedule, steps, x_t, eps, prev_sample=x_prev)
    singles = torch.cat(
        [
            ddim_step(schedule, int(s), x_t[k : k + 1], eps[k : k + 1], prev_sample=x_prev[k : k + 1])[1]
            for k, s in enumerate(steps)
        ]
    )
    torch.testing.assert_close(batched, singles)


def test_mean_matches_diffusers_ddim_scheduler() -> None:
    """With eta=1 and the noise given, our step equals diffusers' DDIMScheduler.step."""
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=False)
    ours = DDIMSchedule.from_diffusers(sched, 10, eta=1.0)
    g = torch.Generator().manual_seed(2)
    x_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps[:-1]):
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i))
        theirs = sched.step(eps, t, x_t, eta=1.0, variance_noise=noise).prev_sample
        mu, sigma = reference(ours, i, x_t, eps)
        torch.testing.assert_close(theirs, mu + sigma * noise, atol=1e-5, rtol=1e-5)


def test_eta_zero_has_no_log_prob() -> None:
    sched = DDIMSchedule.make(DDIMSchedule.linear_betas(), 10, eta=0.0)
    with pytest.raises(ValueError, match="eta"):
        ddim_step(sched, 0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


def test_step_sigmas_are_the_ones_the_steps_use(schedule) -> None:
    sigmas = schedule.sigmas()
    x_t = torch.zeros(1, 3, 4, 4)
    for i in (0, 7, 19):
        assert float(sigmas[i]) == pytest.approx(reference(schedule, i, x_t, x_t)[1], rel=1e-4)
    assert float(sigmas[-1]) < 0.05 < float(sigmas[0])  # the last step is nearly deterministic
