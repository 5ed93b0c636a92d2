"""The micro-model policy-gradient check (docs/experiments.md, "What we learned"; not a test: minutes per run).

``track``: the brightness test's run, with the reward measured after every round on fixed prompts and
noise (the round's own mean moves with the prompts it drew). ``probe``: at initialisation, the
score-function gradient against the pathwise one, and Adam-like first steps from 16-sample slices.

    .venv/bin/python -m tests.trainer.pg_check track --seed 2 --samples 16 --batch 4
    .venv/bin/python -m tests.trainer.pg_check probe
"""

from __future__ import annotations

import argparse
import math
import tempfile
from dataclasses import replace

import torch
from torch import Tensor

from carve3d_trainer.config import load_config
from carve3d_trainer.ddim import ddim_mean
from carve3d_trainer.policies.base import Trajectory
from carve3d_trainer.policies.tiny import TinyGridPolicy
from carve3d_trainer.trainer import Trainer

from .test_trainer import MICRO, BrightnessRewards


def make(args: argparse.Namespace, run_dir: str) -> Trainer:
    """The test's trainer (full finetune, ``beta = 0``) with this run's seed, sizes and architecture."""
    config = load_config(
        None,
        {
            "run_dir": run_dir,
            "seed": args.seed,
            "epochs": args.epochs,
            "samples_per_epoch": args.samples,
            "sample_batch_size": args.batch,
            "eval_every": 0,
            "policy.num_steps": 4,
            "algorithm.train_batch_size": args.batch,
            "algorithm.lr": args.lr,
            "algorithm.warmup_epochs": 1,
            "algorithm.beta": 0.0,
            "reward.mode": "in-process",
        },
    )
    torch.manual_seed(args.init)
    policy = TinyGridPolicy(replace(MICRO, pooled_text=not args.no_pooled))
    policy.enable_full_finetune()
    return Trainer(config, policy=policy, rewards=BrightnessRewards(), progress=False)


def fixed_reward(trainer: Trainer, per_prompt: int = 8) -> float:
    """Mean brightness of 16 prompts x ``per_prompt`` noises, the same every call."""
    prompts = sorted(set(trainer.round_prompts(0) + trainer.round_prompts(1)))[:16] * per_prompt
    trainer.policy.eval()
    traj = trainer.policy.sample(prompts, generator=torch.Generator().manual_seed(7), with_reference=False)
    return float(traj.images.mean())


def track(args: argparse.Namespace, run_dir: str) -> None:
    trainer = make(args, run_dir)
    start = fixed_reward(trainer)
    print(f"fixed-set reward at start {start:.4f}")
    for epoch in range(args.epochs):
        stats = trainer.run_epoch(epoch)
        now = fixed_reward(trainer)
        print(f"round {epoch}: round mean {stats.samples.reward_mean:.4f}, fixed set {now:.4f} ({now - start:+.4f})")


def pathwise_gradient(trainer: Trainer, prompts: list[str], seed: int) -> list[Tensor]:
    """d mean-brightness / d weights through the reparameterised DDIM chain (``x_prev = mu + sigma z``)."""
    policy, schedule = trainer.policy, trainer.policy.schedule
    gen = torch.Generator().manual_seed(seed)
    cond, uncond = policy.encode_prompts(prompts)
    x = torch.randn((len(prompts), *policy.latent_shape()), generator=gen)
    for i in range(len(schedule)):
        mean, sigma = ddim_mean(schedule, i, x, policy.predict_eps(policy.unet, x, i, cond, uncond))
        x = mean + sigma * torch.randn(x.shape, generator=gen)
    params = policy.trainable_parameters()
    return list(torch.autograd.grad(policy.decode(x).clamp(0, 1).mean(), params, allow_unused=True))


def score_function_gradient(trainer: Trainer, index: Tensor, traj: Trajectory, adv: Tensor) -> list[Tensor]:
    """The ascent direction of the trainer's loss on the samples ``index`` (all trained steps)."""
    sub, params = traj.select(index), trainer.policy.trainable_parameters()
    trainer.policy.train()
    loss = sum(
        -(adv[index] * trainer.policy.step_log_prob(sub, j)).mean()
        for j in trainer._trainable_steps(traj.num_steps).tolist()
    )
    return [-g for g in torch.autograd.grad(loss, params, allow_unused=True)]


def probe(args: argparse.Namespace, run_dir: str) -> None:
    trainer = make(args, run_dir)
    params = trainer.policy.trainable_parameters()
    start = [p.detach().clone() for p in params]

    def reward_after(direction: list[Tensor | None], size: float) -> float:
        """The fixed-set reward's change after a step from the start (the weights are restored after)."""
        with torch.no_grad():
            for p, s, d in zip(params, start, direction, strict=True):
                p.copy_(s if d is None else s + size * d)
            change = fixed_reward(trainer, per_prompt=4) - base
            for p, s in zip(params, start, strict=True):
                p.copy_(s)
        return change

    base = fixed_reward(trainer, per_prompt=4)
    traj, results = trainer.sample_round(0)
    adv, _ = trainer.advantages(traj, results)
    sf = score_function_gradient(trainer, torch.arange(len(traj)), traj, adv)
    pw = pathwise_gradient(trainer, list(traj.prompts), seed=99)
    dot = sum(float((a * b).sum()) for a, b in zip(sf, pw, strict=True) if a is not None and b is not None)
    norm = [math.sqrt(sum(float((g * g).sum()) for g in gs if g is not None)) for gs in (sf, pw)]
    print(f"cosine(score-function, pathwise) over {len(traj)} samples: {dot / norm[0] / norm[1]:+.3f}")
    for name, gs, n in (("score-function", sf, norm[0]), ("pathwise", pw, norm[1])):
        unit = [None if g is None else g / n for g in gs]
        print(f"step along the {name} gradient:", *(f"{s}: {reward_after(unit, s):+.4f}" for s in (0.3, 1.0, 3.0)))
    for k in range(3):  # random sign directions of the same size, for scale
        gen = torch.Generator().manual_seed(100 + k)
        sign = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in params]
        print(f"random sign step {k}: {reward_after(sign, args.lr):+.4f}")
    for k in range(len(traj) // 16):
        g = score_function_gradient(trainer, torch.arange(16 * k, 16 * k + 16), traj, adv)
        sign = [None if d is None else d.sign() for d in g]
        up, down = reward_after(sign, args.lr), reward_after(sign, -args.lr)
        print(
            f"slice {k}: sign step + {up:+.4f}, - {down:+.4f}; first order {(up - down) / 2:+.4f}, "
            f"second order {(up + down) / 2:+.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("track", "probe"))
    parser.add_argument("--seed", type=int, default=0, help="the run's seed: its rounds' prompts and noise")
    parser.add_argument("--init", type=int, default=0, help="the random initialisation")
    parser.add_argument("--samples", type=int, default=64, help="samples a round")
    parser.add_argument("--batch", type=int, default=16, help="sampling and training batch")
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--no-pooled", action="store_true", help="cross-attention only (no pooled embedding)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as run_dir:
        (track if args.what == "track" else probe)(args, run_dir)


if __name__ == "__main__":
    main()
