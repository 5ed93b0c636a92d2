"""Checkpoints that restore everything, without pickle.

A checkpoint is a folder written atomically (a temporary folder renamed into
place, then ``latest`` updated): the trainable weights, the optimiser state
(tensors in safetensors, hyper-parameters in JSON), both statistics trackers,
the torch RNG state, the epoch counter and the metric history. Sampling noise
is derived from ``(seed, epoch, process)``, so a resumed run draws exactly the
samples an uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from carve3d_reward.errors import ConfigError

from .trackers import PerPromptStatTracker

LATEST = "latest"
FORMAT_VERSION = 1


@dataclass
class TrainingState:
    """What a checkpoint restores besides the weights."""

    epoch: int  # epochs completed
    history: list[dict[str, Any]]
    metric_id: str = ""


def _optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    # JSON has no tuples: give back the types torch wrote (e.g. Adam's betas)
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in meta["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    run_dir: Path,
    *,
    weights: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    trackers: dict[str, PerPromptStatTracker],
    state: TrainingState,
    config_json: str,
    keep: int = 2,
) -> Path:
    """Write ``run_dir/checkpoints/epoch-NNNN`` atomically and point ``latest`` at it."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{state.epoch:04d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, str(tmp / "weights.safetensors"))
    opt_tensors, opt_meta = _optimizer_to_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    tracker_tensors = {k: v for name, t in trackers.items() for k, v in t.state_tensors(name).items()}
    tracker_tensors["rng.torch"] = torch.get_rng_state()
    save_file(tracker_tensors, str(tmp / "state.safetensors"))
    meta = {
        "format": FORMAT_VERSION,
        "epoch": state.epoch,
        "history": state.history,
        "metric_id": state.metric_id,
        "optimizer": opt_meta,
        "trackers": {name: t.state_meta() for name, t in trackers.items()},
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    (tmp / "config.json").write_text(config_json)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / (LATEST + ".tmp")
    pointer.write_text(final.name)
    os.replace(pointer, root / LATEST)
    for old in sorted(p for p in root.glob("epoch-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(
    path: Path,
    *,
    optimizer: torch.optim.Optimizer,
    trackers: dict[str, PerPromptStatTracker],
) -> tuple[dict[str, Tensor], TrainingState]:
    """Restore optimiser, trackers and RNG; return the weights (for the policy) and the training state."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        weights = load_file(str(path / "weights.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        extra = load_file(str(path / "state.safetensors"))
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ConfigError(
            f"{path}: checkpoint format {meta.get('format')} is not supported (expected {FORMAT_VERSION})"
        )
    _optimizer_from_tensors(optimizer, opt_tensors, meta["optimizer"])
    for name, tracker in trackers.items():
        tracker.load(extra, name, meta["trackers"][name])
    torch.set_rng_state(extra["rng.torch"])
    return weights, TrainingState(meta["epoch"], meta["history"], meta.get("metric_id", ""))
