"""Per-prompt statistics trackers and advantage composition."""

import numpy as np
import pytest
import torch

from carve3d_trainer.trackers import PerPromptStatTracker, compose_advantages, weigh_kl_advantage


def test_normalises_against_each_prompts_own_history() -> None:
    tr = PerPromptStatTracker(buffer_size=8, min_count=2)
    prompts = ["a", "a", "b", "b"]
    adv = tr.update(prompts, torch.tensor([1.0, 3.0, 10.0, 30.0]))
    # Each prompt has 2 values >= min_count: normalised by its own mean/std.
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64), atol=1e-5, rtol=0)


def test_min_count_falls_back_to_batch_statistics() -> None:
    tr = PerPromptStatTracker(buffer_size=8, min_count=3)
    vals = torch.tensor([1.0, 2.0, 3.0, 6.0])
    adv = tr.update(["a", "a", "b", "b"], vals)
    expected = (vals.double() - vals.double().mean()) / (vals.double().std(unbiased=False) + 1e-6)
    torch.testing.assert_close(adv, expected)
    # Next round "a" has 4 values (>= 3): its own stats over the ring buffer.
    adv2 = tr.update(["a", "a"], torch.tensor([5.0, 7.0]))
    hist = np.array([1.0, 2.0, 5.0, 7.0])
    torch.testing.assert_close(adv2, torch.tensor((np.array([5.0, 7.0]) - hist.mean()) / (hist.std() + 1e-6)))


def test_ring_buffer_keeps_the_last_values() -> None:
    tr = PerPromptStatTracker(buffer_size=3, min_count=1)
    tr.update(["p"] * 5, torch.arange(5.0))  # more than a buffer's worth in one batch: keep 2, 3, 4
    assert tr.stats()["p"]["count"] == 3
    assert tr.stats()["p"]["mean"] == pytest.approx(3.0)
    tr.update(["p"], torch.tensor([10.0]))  # evicts the oldest (2)
    assert tr.stats()["p"]["mean"] == pytest.approx((3 + 4 + 10) / 3)


def test_invalid_samples_are_kept_out_and_get_zero_advantage() -> None:
    tr = PerPromptStatTracker(buffer_size=8, min_count=1)
    adv = tr.update(["a", "a", "a"], torch.tensor([1.0, 3.0, 100.0]), valid=torch.tensor([True, True, False]))
    assert adv[2] == 0
    torch.testing.assert_close(adv[:2], torch.tensor([-1.0, 1.0], dtype=torch.float64), atol=1e-5, rtol=0)
    assert tr.stats()["a"]["count"] == 2
    adv = tr.update(["a"], torch.tensor([float("nan")]))  # NaN is never admitted
    assert adv[0] == 0 and tr.stats()["a"]["count"] == 2


def test_state_round_trip_is_exact() -> None:
    tr = PerPromptStatTracker(buffer_size=4, min_count=2)
    rng = torch.Generator().manual_seed(0)
    for _ in range(3):
        tr.update(["x", "y", "z", "x"], torch.randn(4, generator=rng))
    copy = PerPromptStatTracker(buffer_size=4, min_count=2)
    copy.load(tr.state_tensors("r"), "r", tr.state_meta())
    batch = torch.randn(4, generator=rng)
    torch.testing.assert_close(tr.update(["x", "y", "z", "w"], batch), copy.update(["x", "y", "z", "w"], batch))


def test_compose_advantages() -> None:
    a_r, a_kl = torch.tensor([1.0, -2.0, 10.0]), torch.tensor([2.0, 0.0, -10.0])
    out = compose_advantages(a_r, a_kl, alpha=1.0, beta=0.2, clip=5.0)
    torch.testing.assert_close(out, torch.tensor([0.6, -2.0, 5.0]))
    assert compose_advantages(a_r, a_kl, beta=0.0)[0] == 1.0


def test_kl_budget_weighs_the_kl_advantage_by_the_distance_from_the_reference() -> None:
    a_kl = torch.tensor([1.0, -1.0, 0.5])
    assert torch.equal(weigh_kl_advantage(a_kl, 1e-4, None), a_kl)  # the paper's, whatever the KL
    torch.testing.assert_close(weigh_kl_advantage(a_kl, 0.0025, 0.01), a_kl * 0.5)  # sqrt(1/4)
    torch.testing.assert_close(weigh_kl_advantage(a_kl, 0.04, 0.01), a_kl)  # from the budget on: the paper's
    assert torch.equal(weigh_kl_advantage(a_kl, -1e-6, 0.01), torch.zeros(3))  # a KL estimate below 0: no pull


def test_a_single_value_is_normalised_by_the_batch_not_by_itself() -> None:
    """With min_count 1, a prompt's first value would be (v - v) / 0 = 0: no signal at all."""
    tr = PerPromptStatTracker(buffer_size=3, min_count=1)
    adv = tr.update(["a", "b", "c"], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(adv, torch.tensor([-1.2247, 0.0, 1.2247], dtype=torch.float64), atol=1e-4, rtol=0)
    adv = tr.update(["a"], torch.tensor([3.0]))  # now two values of its own: (3 - 2) / 1
    torch.testing.assert_close(adv, torch.tensor([1.0], dtype=torch.float64), atol=1e-5, rtol=0)
