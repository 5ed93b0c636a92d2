"""Prompt sets (files with one prompt per line, ``#`` comments and blank lines ignored, or shipped sets), and
which of a set's prompts each training round samples."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from carve3d_reward.errors import ConfigError

from .seeding import derive_seed

BUILTIN_PREFIX = "builtin:"


def builtin_sets() -> list[str]:
    folder = resources.files("carve3d_trainer") / "prompts"
    return sorted(p.name.removesuffix(".txt") for p in folder.iterdir() if p.name.endswith(".txt"))


def parse_prompts(text: str) -> list[str]:
    """Non-empty, non-comment lines, stripped, duplicates removed (first occurrence kept)."""
    seen: dict[str, None] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            seen.setdefault(line, None)
    return list(seen)


def load_prompts(spec: str) -> list[str]:
    """``builtin:<name>`` (see :func:`builtin_sets`) or a path to a text file."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec.removeprefix(BUILTIN_PREFIX)
        resource = resources.files("carve3d_trainer") / "prompts" / f"{name}.txt"
        if not resource.is_file():
            raise ConfigError(f"no built-in prompt set {name!r}; available: {', '.join(builtin_sets())}")
        text, where = resource.read_text(encoding="utf-8"), spec
    else:
        path = Path(spec)
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read prompts: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: prompts must be UTF-8 text, one per line") from None
    prompts = parse_prompts(text)
    if not prompts:
        raise ConfigError(f"{where}: no prompts (one per line; '#' starts a comment)")
    return prompts


def round_prompts(prompts: list[str], epoch: int, samples: int, per_prompt: int, seed: int) -> list[str]:
    """The prompts of round ``epoch``'s ``samples`` samples: a function of ``(seed, epoch)`` alone.

    ``per_prompt`` 1: each drawn independently (DDPO). k > 1: groups of k, taking the prompts in turn from
    one shuffle of the prompt set per pass (epoch e continues where epoch e - 1 stopped), so every prompt is
    trained equally often.
    """
    n = len(prompts)
    if per_prompt == 1:
        gen = torch.Generator().manual_seed(derive_seed(seed, "prompts", epoch))
        return [prompts[i] for i in torch.randint(n, (samples,), generator=gen).tolist()]
    groups = samples // per_prompt
    first = epoch * groups  # position in the endless sequence of shuffled passes over the prompt set
    passes = range(first // n, (first + groups - 1) // n + 1)
    order = torch.cat(
        [torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "pass", p))) for p in passes]
    )
    picked = order[first - passes[0] * n :][:groups]
    return [prompts[i] for i in picked.repeat_interleave(per_prompt).tolist()]
