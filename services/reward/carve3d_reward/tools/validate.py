"""The paper's Sec. 3.3 experiment on synthetic objects: does MRC rise with inconsistency?

Start from perfectly consistent grids of procedural objects, make one view
inconsistent at controlled levels (a foreign patch, a wrong pose, a colour
shift), and record the mean MRC per level for each kind and distance. A good
metric rises at every level step (monotone) with a rank correlation close
to 1.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm import tqdm

from ..metric import MRC
from ..reconstructors import build_reconstructor
from ..settings import MetricSettings
from .synthetic import INCONSISTENCY_KINDS, inconsistent_views, random_scenes

#: The view made inconsistent (a tile whose neighbours both see it).
INCONSISTENT_VIEW = 1
DEFAULT_VIEW_SIZE = 128


@dataclass(frozen=True)
class ValidationConfig:
    objects: int = 20
    levels: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    kinds: tuple[str, ...] = INCONSISTENCY_KINDS
    distances: tuple[str, ...] = ("l1", "ssim")
    seed: int = 0
    batch_size: int = 10


@dataclass
class Curve:
    """MRC against inconsistency level for one kind and one distance."""

    kind: str
    distance: str
    mean: list[float]
    std: list[float]
    monotone: bool  # the mean rises at every level step
    spearman: float  # rank correlation of (level, MRC) pooled over every object and level
    spearman_within: float  # the same per object, averaged: does each object's MRC rise with the level?


@dataclass
class ValidationReport:
    config: ValidationConfig
    metric_ids: dict[str, str]
    curves: list[Curve] = field(default_factory=list)

    @property
    def all_monotone(self) -> bool:
        return all(c.monotone for c in self.curves)

    def to_dict(self) -> dict[str, object]:
        return {
            "config": asdict(self.config),
            "metric_ids": self.metric_ids,
            "all_monotone": self.all_monotone,
            "curves": [asdict(c) for c in self.curves],
        }


def _validate_config(config: ValidationConfig) -> None:
    from ..errors import ConfigError

    unknown = [k for k in config.kinds if k not in INCONSISTENCY_KINDS]
    if unknown:
        raise ConfigError(f"unknown inconsistency kind(s) {unknown}; known: {', '.join(INCONSISTENCY_KINDS)}")
    if config.objects < 1 or len(config.levels) < 2:
        raise ConfigError("validation needs at least 1 object and 2 levels")
    if any(not 0.0 <= lv <= 1.0 for lv in config.levels) or list(config.levels) != sorted(config.levels):
        raise ConfigError(f"levels must be increasing values in [0, 1], got {list(config.levels)}")


def run_validation(
    settings: MetricSettings, config: ValidationConfig, out_dir: Path | None = None, progress: bool = True
) -> ValidationReport:
    """Run the experiment; with ``out_dir``, also write the plot, a JSON and a Markdown table."""
    _validate_config(config)
    size = settings.view_size or DEFAULT_VIEW_SIZE
    settings = settings.model_copy(update={"view_size": size})
    reconstructor = build_reconstructor(settings)
    metrics = {
        d: MRC(settings.model_copy(update={"distance": d}), reconstructor=reconstructor) for d in config.distances
    }
    first = next(iter(metrics.values()))
    cameras = first.cameras
    scenes = random_scenes(config.objects, seed=config.seed)
    n = config.objects
    scores = {(k, d): np.zeros((len(config.levels), n)) for k in config.kinds for d in config.distances}
    examples: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {k: [] for k in config.kinds}
    steps = len(config.kinds) * len(config.levels) * ((n + config.batch_size - 1) // config.batch_size)
    bar = tqdm(total=steps, desc="validate", unit="batch", disable=not progress)
    for kind in config.kinds:
        for li, level in enumerate(config.levels):
            views = inconsistent_views(scenes, cameras, size, kind, level, view=INCONSISTENT_VIEW, seed=config.seed + 1)
            for start in range(0, n, config.batch_size):
                chunk = views[start : start + config.batch_size]
                renders = first.rerender(chunk)
                for d, metric in metrics.items():
                    scores[kind, d][li, start : start + len(chunk)] = metric.compare(chunk, renders).mrc.numpy()
                if start == 0:
                    examples[kind].append((chunk[0, INCONSISTENT_VIEW], renders[0, INCONSISTENT_VIEW]))
                bar.update()
    bar.close()

    report = ValidationReport(config, {d: m.metric_id for d, m in metrics.items()})
    levels = np.repeat(np.asarray(config.levels), n)  # level-major, like table.reshape(-1)
    for (kind, d), table in scores.items():
        mean = table.mean(axis=1)
        rho = float(spearmanr(levels, table.reshape(-1)).statistic)
        within = [spearmanr(config.levels, table[:, i]).statistic for i in range(n) if np.ptp(table[:, i]) > 0]
        rho_within = float(np.mean(within)) if within else float("nan")
        monotone = bool(np.all(np.diff(mean) > 0))
        report.curves.append(Curve(kind, d, mean.tolist(), table.std(axis=1).tolist(), monotone, rho, rho_within))
    if out_dir is not None:
        write_report(report, examples, out_dir)
    return report


def write_report(
    report: ValidationReport, examples: dict[str, list[tuple[torch.Tensor, torch.Tensor]]], out_dir: Path
) -> None:
    """``validate.json``, ``validate.md``, ``validate.png`` (curves) and ``examples.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "validate.json").write_text(json.dumps(report.to_dict(), indent=2))
    (out_dir / "validate.md").write_text(markdown_table(report))

    levels = report.config.levels
    distances = report.config.distances
    fig, axes = plt.subplots(1, len(distances), figsize=(4.5 * len(distances), 3.6), squeeze=False)
    for ax, d in zip(axes[0], distances, strict=True):
        for c in (c for c in report.curves if c.distance == d):
            mean, std = np.asarray(c.mean), np.asarray(c.std)
            ax.plot(levels, mean, marker="o", label=f"{c.kind} (rho={c.spearman:.2f})")
            ax.fill_between(levels, mean - std, mean + std, alpha=0.15)
        ax.set_title(f"MRC with {d}")
        ax.set_xlabel("inconsistency level of one view")
        ax.set_ylabel("MRC (mean ± std over objects)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "validate.png", dpi=120)
    plt.close(fig)

    kinds = list(examples)
    fig, axes = plt.subplots(2 * len(kinds), len(levels), figsize=(1.6 * len(levels), 3.3 * len(kinds)), squeeze=False)
    for r, kind in enumerate(kinds):
        for c, (view, render) in enumerate(examples[kind]):
            for k, (img, what) in enumerate(((view, "input"), (render, "re-render"))):
                ax = axes[2 * r + k, c]
                ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(f"{kind}\n{what}", fontsize=8)
                if r == 0 and k == 0:
                    ax.set_title(f"level {levels[c]:g}", fontsize=8)
    fig.suptitle(f"view {INCONSISTENT_VIEW} of object 0 and its re-render", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "examples.png", dpi=100)
    plt.close(fig)


def markdown_table(report: ValidationReport) -> str:
    levels = report.config.levels
    head = "| kind | distance | " + " | ".join(f"L={lv:g}" for lv in levels)
    head += " | monotone | Spearman (pooled) | Spearman (within object) |\n"
    head += "|---|---|" + "---|" * len(levels) + "---|---|---|\n"
    rows = "".join(
        f"| {c.kind} | {c.distance} | "
        + " | ".join(f"{m:.4f}" for m in c.mean)
        + f" | {'yes' if c.monotone else 'NO'} | {c.spearman:.3f} | {c.spearman_within:.3f} |\n"
        for c in report.curves
    )
    ids = "".join(f"- `{d}`: `{mid}`\n" for d, mid in report.metric_ids.items())
    return (
        f"# MRC validation ({report.config.objects} synthetic objects, view {INCONSISTENT_VIEW} made inconsistent)\n\n"
        + head
        + rows
        + f"\nAll curves monotone: **{'yes' if report.all_monotone else 'no'}**\n\nMetric ids:\n{ids}"
    )


def print_report(report: ValidationReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"MRC vs inconsistency level ({report.config.objects} objects)")
    table.add_column("kind")
    table.add_column("distance")
    for lv in report.config.levels:
        table.add_column(f"{lv:g}", justify="right")
    table.add_column("monotone")
    table.add_column("rho pooled", justify="right")
    table.add_column("rho within", justify="right")
    for c in report.curves:
        table.add_row(
            c.kind,
            c.distance,
            *(f"{m:.4f}" for m in c.mean),
            "[green]yes[/green]" if c.monotone else "[red]NO[/red]",
            f"{c.spearman:.3f}",
            f"{c.spearman_within:.3f}",
        )
    console = Console(width=max(Console().width, 150))
    console.print(table)
    console.print(f"all curves monotone: {'yes' if report.all_monotone else 'no'}")
