"""What a person sees of a run: a line per epoch, TensorBoard, metrics.jsonl, report.md with curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from carve3d_reward.errors import ConfigError

from .config import TargetsConfig
from .run_layout import BASE_EPOCH, COMPARE, CURVES, METRICS, REPORT, TENSORBOARD, epoch_label, epoch_sheets, sheet_path

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
    "eval_alignment",
    "eval_diversity",
    "invalid",
    "skipped_steps",
)


class EpochLogger:
    """Prints a table row per epoch and keeps TensorBoard, ``metrics.jsonl`` and ``report.md`` current.

    ``targets`` (with the run's ``kl_stop``): what ``report.md`` checks the run against.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        metric_id: str = "",
        targets: TargetsConfig | None = None,
        kl_stop: float | None = None,
        enabled: bool = True,
    ) -> None:
        self.run_dir = run_dir
        self.metric_id = metric_id
        self.targets = targets
        self.kl_stop = kl_stop
        self.enabled = enabled
        self.writer = None
        if enabled:
            from rich.console import Console
            from torch.utils.tensorboard import SummaryWriter

            self.console = Console(width=max(Console().width, 110))
            self.writer = SummaryWriter(str(self.run_dir / TENSORBOARD))
            self.console.print(
                f"[bold]{'epoch':>5} {'reward':>9} {'MRC':>8} {'KL':>9} {'eval MRC':>9} {'align%':>6} {'loss':>9} "
                f"{'|grad|':>8} {'wait s':>7} {'samp/s':>7} {'invalid':>7}[/bold]",
                soft_wrap=True,
            )

    def log(self, record: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Show ``record`` (the latest of ``history``, the run's records so far) everywhere."""
        if not self.enabled:
            return
        epoch = record["epoch"]
        for key in SCALARS:
            value = record.get(key)
            if isinstance(value, int | float) and math.isfinite(value) and self.writer is not None:
                self.writer.add_scalar(key, value, epoch)
        sheet = sheet_path(self.run_dir, epoch)
        if sheet.exists() and self.writer is not None:
            import numpy as np
            from PIL import Image

            with Image.open(sheet) as img:
                self.writer.add_image("eval/sheet", np.asarray(img.convert("RGB")), epoch, dataformats="HWC")
        with (self.run_dir / METRICS).open("a") as f:
            f.write(json.dumps(record) + "\n")

        def fmt(key: str, width: int, spec: str = ".4f") -> str:
            value = record.get(key)
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                return "-".rjust(width)
            return format(value, spec).rjust(width)

        note = "" if record.get("updated", True) else f"  ({_no_update(record)})"
        self.console.print(
            f"{epoch_label(epoch):>5} {fmt('reward_mean', 9)} {fmt('mrc_mean', 8)} {fmt('kl_mean', 9, '.2e')} "
            f"{fmt('eval_mrc', 9)} {fmt('eval_alignment', 6, '.1f')} "
            f"{fmt('loss', 9, '.2e')} {fmt('grad_norm', 8, '.1e')} "
            f"{fmt('reward_wait_s', 7, '.1f')} {fmt('samples_per_s', 7, '.2f')} {fmt('invalid', 7, 'd')}{note}",
            soft_wrap=True,
        )
        write_report(self.run_dir, history, self.metric_id, self.targets, self.kl_stop)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _evals(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [h for h in history if h.get("eval_mrc") is not None and math.isfinite(h["eval_mrc"])]


def before_after(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Base (the first held-out evaluation, before any update) against the last one; None without both."""
    evals = _evals(history)
    # the base model's record (BASE_EPOCH; in older runs epoch 0's, taken before its update), or an evaluation
    # after a warm-up round that updated nothing (older runs)
    of_base = bool(evals and (evals[0].get("eval_before_update") or not evals[0].get("updated", True)))
    if len(evals) < 2 or not of_base:
        return None
    base, last = evals[0], evals[-1]

    def get(h: dict[str, Any], key: str) -> float:
        value = h.get(key)
        return float(value) if value is not None else math.nan

    return {
        "base_epoch": base["epoch"],
        "final_epoch": last["epoch"],
        "mrc": (get(base, "eval_mrc"), get(last, "eval_mrc")),
        "mrc_se": (get(base, "eval_mrc_se"), get(last, "eval_mrc_se")),
        "mrc_change": get(last, "eval_mrc") / get(base, "eval_mrc") - 1.0,
        "alignment": (get(base, "eval_alignment"), get(last, "eval_alignment")),
        "alignment_change": get(last, "eval_alignment") - get(base, "eval_alignment"),
        "diversity": (get(base, "eval_diversity"), get(last, "eval_diversity")),
        "kl": (get(base, "eval_kl"), get(last, "eval_kl")),
        "train_kl": get(history[-1], "kl_mean"),
    }


def check_targets(summary: dict[str, Any], targets: TargetsConfig, kl_stop: float | None) -> dict[str, bool]:
    """Each target set in ``targets`` met or not (computed from the run's own numbers; ``kl_stop``: the run's)."""
    checks = {}
    if targets.min_mrc_drop is not None:
        checks[f"held-out MRC falls by >= {targets.min_mrc_drop:.0%}"] = summary["mrc_change"] <= -targets.min_mrc_drop
    if targets.max_alignment_drop is not None:
        checks[f"alignment drops by <= {targets.max_alignment_drop:g} points"] = (
            summary["alignment_change"] >= -targets.max_alignment_drop
        )
    if targets.kl_under_stop and kl_stop is not None:
        checks[f"KL stays under kl_stop = {kl_stop:g}"] = summary["train_kl"] < kl_stop
    return checks


def compare_sheets(run_dir: Path, base_epoch: int, final_epoch: int) -> Path | None:
    """``compare.png``: the base model's held-out sheet beside the finetuned one (same prompts, same noise)."""
    from PIL import Image

    paths = [sheet_path(run_dir, e) for e in (base_epoch, final_epoch)]
    if not all(p.exists() for p in paths):
        return None
    left, right = (Image.open(p).convert("RGB") for p in paths)
    gap = 16
    out = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), "white")
    out.paste(left, (0, 0))
    out.paste(right, (left.width + gap, 0))
    path = run_dir / COMPARE
    out.save(path)
    return path


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def write_report(
    run_dir: Path,
    history: list[dict[str, Any]],
    metric_id: str = "",
    targets: TargetsConfig | None = None,
    kl_stop: float | None = None,
) -> Path:
    """``report.md``: curves (``curves.png``), the per-epoch table, base vs finetuned, the latest sheet.

    With ``targets`` it also says, from the run's own numbers (and its ``kl_stop``), whether each was met.
    """
    checks_kl = targets is not None and targets.kl_under_stop and kl_stop is not None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        """The epochs that have ``key`` (evaluations are not every epoch) and its values, so lines connect."""
        points = [(h["epoch"], float(h[key])) for h in history if h.get(key) is not None and math.isfinite(h[key])]
        return [p[0] for p in points], [p[1] for p in points]

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].plot(*series("mrc_mean"), marker="o", label="train samples")
    axes[0].plot(*series("eval_mrc"), marker="s", label="held-out prompts")
    axes[0].set_title("MRC (lower = more 3D-consistent)")
    axes[1].plot(*series("kl_mean"), marker="o", color="tab:red", label="train samples")
    axes[1].plot(*series("eval_kl"), marker="s", color="tab:orange", label="held-out prompts")
    if checks_kl:
        axes[1].axhline(kl_stop, color="black", ls="--", lw=1, label="kl_stop")
    axes[1].set_title("KL to the base model")
    axes[2].plot(*series("eval_alignment"), marker="s", color="tab:green")
    axes[2].set_title("prompt alignment, held-out (%)")
    axes[3].plot(*series("eval_diversity"), marker="s", color="tab:purple")
    axes[3].set_title("diversity within a prompt, held-out")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / CURVES, dpi=110)
    plt.close(fig)

    lines = [
        f"| {epoch_label(h['epoch'])} | {_fmt(h.get('mrc_mean'), '.4f')} | {_fmt(h.get('kl_mean'), '.3e')} | "
        f"{_fmt(h.get('eval_mrc'), '.4f')} | {_fmt(h.get('eval_alignment'), '.1f')} | "
        f"{_fmt(h.get('eval_diversity'), '.4f')} | {h.get('invalid', 0)} | "
        f"{'yes' if h.get('updated') else _no_update(h)} |"
        for h in history
    ]
    text = (
        "# Carve3D RL finetuning report\n\n"
        f"Reward metric: `{metric_id or 'unknown'}`\n\n"
        f"![curves]({CURVES})\n\n"
        "| epoch | train MRC | KL | held-out MRC | alignment % | diversity | invalid | update |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )
    summary = before_after(history)
    if summary is not None:
        (m0, m1), (a0, a1), (d0, d1), (k0, k1) = (summary[k] for k in ("mrc", "alignment", "diversity", "kl"))
        se0, se1 = summary["mrc_se"]
        text += (
            f"\n## Base model (before any update) vs finetuned (epoch {summary['final_epoch']}), "
            "held-out prompts\n\n"
            "| | base | finetuned | change |\n|---|---|---|---|\n"
            f"| MRC (+- standard error) | {m0:.4f} +- {_fmt(se0, '.4f')} | {m1:.4f} +- {_fmt(se1, '.4f')} | "
            f"{summary['mrc_change']:+.1%} |\n"
            f"| alignment % | {a0:.1f} | {a1:.1f} | {summary['alignment_change']:+.1f} points |\n"
            f"| diversity | {_fmt(d0, '.4f')} | {_fmt(d1, '.4f')} | |\n"
            f"| KL to the base (held-out) | {k0:.3e} | {k1:.3e} | |\n"
        )
        checks = check_targets(summary, targets, kl_stop) if targets is not None else {}
        if checks:
            text += "\n" + "\n".join(f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()) + "\n"
        compare = compare_sheets(run_dir, summary["base_epoch"], summary["final_epoch"])
        if compare is not None:
            text += "\nSame prompts, same noise: base (left) and finetuned (right), each grid beside its re-render.\n\n"
            text += f"![base vs finetuned]({compare.name})\n"
    sheets = epoch_sheets(run_dir) or [sheet_path(run_dir, BASE_EPOCH)]
    sheets = [p for p in sheets if p.exists()]
    if sheets:
        text += f"\n## Latest held-out samples\n\n![samples]({sheets[-1].relative_to(run_dir)})\n"
    path = run_dir / REPORT
    path.write_text(text)
    return path


def load_history(run_dir: Path) -> list[dict[str, Any]]:
    """A run's per-epoch records (``metrics.jsonl``; a resumed run's repeated epochs keep the last)."""
    path = run_dir / METRICS
    if not path.exists():
        raise ConfigError(f"{run_dir}: no {METRICS} (not a run folder, or no epoch finished yet)")
    records: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["epoch"]] = record
    return [records[k] for k in sorted(records)]


def compare_runs(runs: dict[str, Path], out: Path) -> Path:
    """One figure of several runs (ablations): held-out MRC, train KL, alignment and diversity per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = (
        ("eval_mrc", "held-out MRC"),
        ("kl_mean", "KL to the base (train samples)"),
        ("eval_alignment", "prompt alignment, held-out (%)"),
        ("eval_diversity", "diversity, held-out"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.6))
    for label, run_dir in runs.items():
        history = load_history(run_dir)
        for ax, (key, _) in zip(axes, panels, strict=True):
            points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None and math.isfinite(h[key])]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _no_update(record: dict[str, Any]) -> str:
    """Why a round made no update: the KL stop (that round measured the model it ends with) or warm-up."""
    if record["epoch"] == BASE_EPOCH:
        return "- (base model)"
    return "none: KL stop" if record.get("stopped_early") else "warm-up: trackers only"
