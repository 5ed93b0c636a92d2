"""Prompt alignment and diversity (what MRC does not see), checked on ground-truth renders."""

from __future__ import annotations

import math
import random

import torch

from carve3d_trainer.prompts import load_prompts
from carve3d_trainer.quality import PALETTE, aligned, colour_shares, diversity, prompt_colours
from carve3d_trainer.sft_data import random_prompt, sft_batch


def _prompts() -> list[str]:
    rng = random.Random(5)
    shipped = load_prompts("builtin:shapes-train") + load_prompts("builtin:shapes-test")
    return shipped + [random_prompt(rng) for _ in range(20)]


def test_ground_truth_renders_are_aligned_and_mismatched_prompts_are_not() -> None:
    prompts = _prompts()
    grids = sft_batch(prompts, seed=3, view_size=32)
    assert aligned(grids, prompts).all()
    # the same renders under other prompts: mostly misaligned (chance is about one in six)
    shifted = prompts[7:] + prompts[:7]
    assert aligned(grids, shifted).float().mean() < 0.4


def test_noise_and_blank_grids_are_not_aligned() -> None:
    prompts = _prompts()
    noise = torch.rand(len(prompts), 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert aligned(noise, prompts).float().mean() < 0.4
    assert not aligned(torch.ones(2, 3, 64, 64), prompts[:2]).any()  # white: no object at all


def test_colour_shares_are_shading_invariant() -> None:
    red = torch.tensor([0.85, 0.12, 0.10]).view(1, 3, 1, 1)
    image = torch.ones(1, 3, 8, 8)
    image[..., :4, :] = red * 0.5  # a dark (shaded) half
    image[..., 4:, :] = red
    shares = colour_shares(image)
    assert shares[0, PALETTE.index("red")] == 1.0


def test_prompt_colours_follow_the_grammar() -> None:
    assert prompt_colours("a yellow sphere on a blue cube") == ("yellow", "blue")
    assert prompt_colours("a striped green cube") == ("green",)
    assert prompt_colours("a cube") == ()


def test_diversity_is_zero_for_copies_and_grows_with_differences() -> None:
    prompts = ["a red sphere", "a red sphere", "a blue cube", "a blue cube"]
    grids = sft_batch(prompts, seed=1, view_size=16)
    assert diversity(grids, prompts) > 0.0
    copies = torch.cat([grids[:1], grids[:1], grids[2:3], grids[2:3]])
    assert diversity(copies, prompts) == 0.0
    assert math.isnan(diversity(grids[:2], ["a", "b"]))  # no prompt has two samples
