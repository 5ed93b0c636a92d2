"""What MRC does not see: prompt alignment and sample diversity of generated grids.

A policy can lower MRC by drawing something easier to reconstruct than what was
asked for (a smaller object, another colour, the same picture every time), so a
run is judged on these too (the paper checks alignment with CLIP scores and a user
study; neither is available offline, so for the procedural prompts of
:mod:`.sft_data` the prompt's attributes are recovered from the pixels instead):

* **alignment**: every colour the prompt names is among the grid's most common
  palette colours (as many as the prompt names, plus one per striped or checkered
  object, whose second colour is another palette colour) and covers at least
  ``min_share`` of its coloured pixels. Colours are compared by hue, which the synthetic
  scenes' Lambertian shading does not change (it only scales brightness), so a
  shaded side of a red cube is still red. Ground-truth renders of the shipped
  prompts are aligned (tested), the same renders under other prompts mostly are not, and
  neither is noise.
* **diversity**: the mean absolute pixel difference between two samples of the
  same prompt, averaged over prompts (0: the policy draws one picture per prompt).

Both are batched tensor functions: ``[B, 3, H, W]`` images in ``[0, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .sft_data import COLOURS, parse_prompt

#: Pixels less saturated than this are background, highlights or grey blur, not a colour.
MIN_SATURATION = 0.3
#: Pixels darker than this carry no reliable hue.
MIN_VALUE = 0.1
#: Share of the coloured pixels a named colour must cover.
MIN_SHARE = 0.1
#: Palette order used by :func:`colour_shares`.
PALETTE = tuple(COLOURS)


def _hue_saturation_value(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pixel HSV of ``[B, 3, H, W]`` RGB; hue in degrees ``[0, 360)``."""
    r, g, b = images.unbind(1)
    value, arg = images.max(dim=1)
    chroma = value - images.min(dim=1).values
    safe = chroma.clamp_min(1e-6)
    hue = torch.where(
        arg == 0,
        ((g - b) / safe) % 6.0,
        torch.where(arg == 1, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    saturation = chroma / value.clamp_min(1e-6)
    return hue * 60.0, saturation, value


def _palette_hues() -> Tensor:
    rgb = torch.tensor([COLOURS[c] for c in PALETTE], dtype=torch.float32).view(1, len(PALETTE), 1, 3)
    hue, _, _ = _hue_saturation_value(rgb.permute(0, 3, 1, 2))
    return hue.flatten()


def colour_shares(images: Tensor) -> Tensor:
    """``[B, P]``: the share of each grid's coloured pixels whose hue is nearest each palette colour.

    Rows of grids without coloured pixels are all zero.
    """
    hue, sat, val = _hue_saturation_value(images.to(torch.float32).clamp(0.0, 1.0))
    coloured = (sat >= MIN_SATURATION) & (val >= MIN_VALUE)  # [B, H, W]
    diff = (hue.unsqueeze(-1) - _palette_hues().to(hue.device)).abs()  # [B, H, W, P]
    nearest = torch.minimum(diff, 360.0 - diff).argmin(dim=-1)
    onehot = torch.nn.functional.one_hot(nearest, len(PALETTE)).to(torch.float32) * coloured.unsqueeze(-1)
    counts = onehot.sum(dim=(1, 2))
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)


def prompt_colours(prompt: str) -> tuple[str, ...]:
    """The palette colours a prompt names for its objects (modifiers and unknown words aside)."""
    return tuple(dict.fromkeys(o.colour for o in parse_prompt(prompt).objects if o.colour is not None))


def _two_coloured(prompt: str) -> int:
    return sum(1 for o in parse_prompt(prompt).objects if {"striped", "checkered"} & set(o.modifiers))


def aligned(images: Tensor, prompts: Sequence[str], min_share: float = MIN_SHARE) -> Tensor:
    """``[B]`` bool: the colours the prompt names are the grid's top colours, each ``min_share`` of it.

    "Top": among the ``n + m`` most common palette colours, ``n`` the colours named and ``m`` the
    striped or checkered objects.
    A prompt that names no colour asks only for an object: aligned when the grid has coloured pixels.
    """
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    shares = colour_shares(images)
    wanted = torch.zeros_like(shares, dtype=torch.bool)
    top_k = torch.zeros(len(prompts), dtype=torch.int64)
    for i, prompt in enumerate(prompts):
        named = prompt_colours(prompt)
        for colour in named:
            wanted[i, PALETTE.index(colour)] = True
        top_k[i] = len(named) + _two_coloured(prompt)
    rank = shares.argsort(dim=1, descending=True).argsort(dim=1)  # 0 = the most common colour
    ok = (shares >= min_share) & (rank < top_k.unsqueeze(1))
    has_colour = shares.sum(dim=1) > 0
    return (ok | ~wanted).all(dim=1) & has_colour


def diversity(images: Tensor, prompts: Sequence[str]) -> float:
    """Mean absolute pixel difference between samples of the same prompt, averaged over prompts.

    NaN when no prompt has two samples.
    """
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    flat = images.to(torch.float32).flatten(1)
    per_prompt = []
    for prompt in dict.fromkeys(prompts):
        idx = [i for i, p in enumerate(prompts) if p == prompt]
        if len(idx) < 2:
            continue
        x = flat[idx]
        pair = torch.cdist(x, x, p=1.0) / x.shape[1]  # [k, k] mean |a - b| per pair
        k = len(idx)
        per_prompt.append(float(pair.sum() / (k * (k - 1))))
    return sum(per_prompt) / len(per_prompt) if per_prompt else math.nan
