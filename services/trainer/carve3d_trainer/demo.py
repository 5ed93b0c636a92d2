"""``carve3d-train demo``: the miniature Carve3D, end to end on one CPU.

Starts the reward service (``mrc serve``, embedded default metric) on a free
loopback port and RL-finetunes the shipped SFT model (``builtin:tiny-sft``: a
small multi-view diffusion model stopped early, so its views disagree, as the
paper's base model's do) against it over HTTP: train prompts for the updates,
held-out prompts for the evaluation (MRC, KL, prompt alignment, diversity). It
prints a table row per epoch and writes ``report.md``: curves, base vs
finetuned with the demo's targets checked from the run's own numbers, and
the two models' samples side by side. The service is stopped at the end
(SIGTERM: it drains first).

The run's settings are the shipped preset ``demo`` (``configs/demo.json``;
docs/trainer.md says why each has its value), so that
``carve3d-train train --config configs/demo.json`` against a service started
with :data:`DEMO_SERVICE_ARGS` is the same run.
"""

from __future__ import annotations

import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from carve3d_reward.service.launch import serve_subprocess

from .config import TrainConfig, config_file, load_config
from .reporting import before_after, check_targets
from .run_layout import COMPARE, CURVES, REPORT, TENSORBOARD
from .trainer import Trainer

#: Metric settings of the demo's service: the tiny model draws 64 px grids (32 px views).
DEMO_SERVICE_ARGS = ("--view-size", "32", "--carve-resolution", "48", "--carve-samples", "96", "--max-delay-ms", "5")

#: The demo's settings: a preset shipped with the package (the same file as configs/demo.json).
DEMO_PRESET = "demo"


def demo_config(run_dir: Path, reward_url: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The demo's run: the ``demo`` preset in ``run_dir``, scored by the service at ``reward_url``.

    ``overrides`` (dotted keys) win over the preset; the reward is always that service's.
    """
    settings = {"run_dir": str(run_dir), **(overrides or {}), "reward.mode": "service", "reward.url": reward_url}
    return load_config(config_file(DEMO_PRESET), settings)


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM ends the demo like Ctrl-C does: through the ``finally`` blocks, so the service is stopped too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(
    out_dir: Path,
    *,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Service + RL finetuning with the ``demo`` preset (``overrides`` win); returns the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with _sigterm_exits(), serve_subprocess(*DEMO_SERVICE_ARGS, log=out_dir / "reward-service.log") as (url, _):
        print(f"reward service ready at {url} (log: {out_dir / 'reward-service.log'})")
        config = demo_config(out_dir / "run", url, overrides)
        shutil.rmtree(config.run_dir, ignore_errors=True)
        trainer = Trainer(config, progress=progress)
        try:
            history = trainer.train()
        finally:
            trainer.close()
    summary = before_after(history)
    if summary is not None:
        (m0, m1), (a0, a1) = summary["mrc"], summary["alignment"]
        print(
            f"held-out MRC {m0:.4f} -> {m1:.4f} ({summary['mrc_change']:+.1%}), "
            f"alignment {a0:.1f}% -> {a1:.1f}%, KL {summary['train_kl']:.3g}"
        )
        for name, ok in check_targets(summary, config.targets, config.algorithm.kl_stop).items():
            print(f"  {'PASS' if ok else 'FAIL'}: {name}")
    run_dir = config.run_dir
    print(f"report: {run_dir / REPORT}\ncurves: {run_dir / CURVES}")
    print(f"base vs finetuned: {run_dir / COMPARE}")
    print(f"TensorBoard: tensorboard --logdir {run_dir / TENSORBOARD}")
    return run_dir / REPORT
