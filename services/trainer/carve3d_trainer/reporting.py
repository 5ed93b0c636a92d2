"""What a person sees of a run: a line per epoch, TensorBoard, metrics.jsonl, report.md with curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .trainer import Trainer

SCALARS = (
    "reward_mean",
    "reward_std",
    "mrc_mean",
    "kl_mean",
    "loss",
    "grad_norm",
    "reward_wait_s",
    "samples_per_s",
    "eval_mrc",
    "eval_kl",
    "invalid",
    "skipped_steps",
)


class EpochLogger:
    """Prints a table row per epoch and keeps TensorBoard, ``metrics.jsonl`` and ``report.md`` current."""

    def __init__(self, trainer: Trainer, enabled: bool = True) -> None:
        self.trainer = trainer
        self.enabled = enabled
        self.run_dir = trainer.cfg.run_dir
        self.writer = None
        if enabled:
            from rich.console import Console
            from torch.utils.tensorboard import SummaryWriter

            self.console = Console(width=max(Console().width, 110))
            self.writer = SummaryWriter(str(self.run_dir / "tb"))
            self.console.print(
                f"[bold]{'epoch':>5} {'reward':>9} {'MRC':>8} {'KL':>9} {'eval MRC':>9} {'loss':>9} "
                f"{'|grad|':>8} {'wait s':>7} {'samp/s':>7} {'invalid':>7}[/bold]",
                soft_wrap=True,
            )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        epoch = record["epoch"]
        for key in SCALARS:
            value = record.get(key)
            if isinstance(value, int | float) and math.isfinite(value) and self.writer is not None:
                self.writer.add_scalar(key, value, epoch)
        sheet = self.run_dir / "eval" / f"epoch-{epoch:04d}.png"
        if sheet.exists() and self.writer is not None:
            import numpy as np
            from PIL import Image

            with Image.open(sheet) as img:
                self.writer.add_image("eval/sheet", np.asarray(img.convert("RGB")), epoch, dataformats="HWC")
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

        def fmt(key: str, width: int, spec: str = ".4f") -> str:
            value = record.get(key)
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                return "-".rjust(width)
            return format(value, spec).rjust(width)

        note = "" if record.get("updated", True) else "  (warm-up: trackers only)"
        self.console.print(
            f"{epoch:>5} {fmt('reward_mean', 9)} {fmt('mrc_mean', 8)} {fmt('kl_mean', 9, '.2e')} "
            f"{fmt('eval_mrc', 9)} {fmt('loss', 9, '.2e')} {fmt('grad_norm', 8, '.3f')} "
            f"{fmt('reward_wait_s', 7, '.1f')} {fmt('samples_per_s', 7, '.2f')} {fmt('invalid', 7, 'd')}{note}",
            soft_wrap=True,
        )
        write_report(self.run_dir, self.trainer.state.history, self.trainer.state.metric_id)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_report(run_dir: Path, history: list[dict[str, Any]], metric_id: str = "") -> Path:
    """``report.md`` with reward/KL/eval curves (``curves.png``) and the latest eval sheet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]

    def series(key: str) -> list[float]:
        return [h.get(key) if h.get(key) is not None else math.nan for h in history]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, series("mrc_mean"), marker="o", label="train samples")
    axes[0].plot(epochs, series("eval_mrc"), marker="s", label="held-out prompts")
    axes[0].set_title("MRC (lower = more 3D-consistent)")
    axes[1].plot(epochs, series("kl_mean"), marker="o", color="tab:red")
    axes[1].set_title("KL to the base model")
    axes[2].plot(epochs, series("reward_std"), marker="o", color="tab:green")
    axes[2].set_title("reward std within a round")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=110)
    plt.close(fig)

    lines = []
    for h in history:
        ev = f"{h['eval_mrc']:.4f}" if h.get("eval_mrc") is not None else "-"
        lines.append(
            f"| {h['epoch']} | {h.get('mrc_mean', math.nan):.4f} | {h.get('kl_mean', math.nan):.3e} | {ev} | "
            f"{h.get('invalid', 0)} | {'yes' if h.get('updated') else 'warm-up'} |"
        )
    sheets = sorted((run_dir / "eval").glob("epoch-*.png")) if (run_dir / "eval").exists() else []
    latest = f"\n## Latest held-out samples\n\n![samples]({sheets[-1].relative_to(run_dir)})\n" if sheets else ""
    text = (
        "# Carve3D RL finetuning report\n\n"
        f"Reward metric: `{metric_id or 'unknown'}`\n\n"
        "![curves](curves.png)\n\n"
        "| epoch | train MRC | KL | held-out MRC | invalid | update |\n|---|---|---|---|---|---|\n"
        + "\n".join(lines)
        + "\n"
        + latest
    )
    path = run_dir / "report.md"
    path.write_text(text)
    return path
