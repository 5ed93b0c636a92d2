"""Where a run's files go in its folder (``run_dir``), and how its records name the base model."""

from __future__ import annotations

from pathlib import Path

BASE_EPOCH = -1
"""The epoch of the base model's evaluation record: record ``e`` holds the model after round ``e``, the base
model is the one before round 0 (with no warm-up round, round 0 already updates it)."""

CONFIG = "config.json"  # the resolved settings, token masked
METRICS = "metrics.jsonl"  # one record per epoch, after the base model's
REPORT = "report.md"
CURVES = "curves.png"
COMPARE = "compare.png"  # the base model's held-out sheet beside the finetuned one
TENSORBOARD = "tb"
EVAL = "eval"  # the held-out sheets


def epoch_label(epoch: int) -> str:
    return "base" if epoch == BASE_EPOCH else str(epoch)


def sheet_path(run_dir: Path, epoch: int) -> Path:
    """Where an evaluation's sheet of held-out samples goes (``eval/base.png`` for the base model's)."""
    return run_dir / EVAL / ("base.png" if epoch == BASE_EPOCH else f"epoch-{epoch:04d}.png")


def epoch_sheets(run_dir: Path) -> list[Path]:
    """The sheets of the evaluations after an update, oldest first."""
    return sorted((run_dir / EVAL).glob("epoch-*.png"))
