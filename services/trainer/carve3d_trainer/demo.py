"""``carve3d-train demo``: the whole loop on one CPU in a few minutes.

Starts the reward service (``mrc serve``, embedded default metric) on a free
loopback port, finetunes the small CPU model against it over HTTP for a few
epochs, prints reward and KL per epoch, writes the report and stops the
service (SIGTERM: it drains first).
"""

from __future__ import annotations

from pathlib import Path

from carve3d_reward.service.launch import serve_subprocess

from .config import load_config

#: Metric settings of the demo's service: the tiny model draws 64 px grids (32 px views).
DEMO_SERVICE_ARGS = ("--view-size", "32", "--carve-resolution", "48", "--carve-samples", "96", "--max-delay-ms", "5")


def run_demo(out_dir: Path, *, epochs: int = 4, policy_path: str | None = None, progress: bool = True) -> Path:
    """Service + short finetuning; returns the report's path."""
    from .trainer import Trainer

    out_dir.mkdir(parents=True, exist_ok=True)
    with serve_subprocess(*DEMO_SERVICE_ARGS, log=out_dir / "reward-service.log") as (url, _):
        print(f"reward service ready at {url} (log: {out_dir / 'reward-service.log'})")
        overrides = {
            "run_dir": str(out_dir / "run"),
            "epochs": epochs,
            "samples_per_epoch": 16,
            "sample_batch_size": 8,
            "eval_every": 1,
            "policy.num_steps": 10,
            "policy.guidance_scale": 3.0,
            "algorithm.train_batch_size": 8,
            "algorithm.lr": 3e-3,
            "algorithm.warmup_epochs": 1,
            "reward.mode": "service",
            "reward.url": url,
        }
        if policy_path:
            overrides["policy.path"] = policy_path
        config = load_config(None, overrides)
        import shutil

        shutil.rmtree(config.run_dir, ignore_errors=True)
        trainer = Trainer(config, progress=progress)
        try:
            trainer.train()
        finally:
            trainer.close()
    report = config.run_dir / "report.md"
    print(f"report: {report}\ncurves: {config.run_dir / 'curves.png'}")
    print(f"TensorBoard: tensorboard --logdir {config.run_dir / 'tb'}")
    return report
