"""``carve3d-train demo``: the whole loop on one CPU in a few minutes.

Starts the reward service (``mrc serve``, embedded default metric) on a free
loopback port, finetunes the small CPU model against it over HTTP for a few
epochs, prints reward and KL per epoch, writes the report and stops the
service (SIGTERM: it drains first).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from carve3d_reward.errors import MRCError

from .config import load_config

#: Metric settings of the demo's service: the tiny model draws 64 px grids (32 px views).
DEMO_SERVICE_ARGS = ("--view-size", "32", "--carve-resolution", "48", "--carve-samples", "96", "--max-delay-ms", "5")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def reward_service(log_path: Path, startup_timeout: float = 120.0) -> Iterator[str]:
    """Run ``mrc serve`` on loopback for the duration of the block; yields its URL."""
    port = _free_port()
    exe = Path(sys.executable).with_name("mrc")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), *DEMO_SERVICE_ARGS],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise MRCError(f"the reward service exited at start-up (exit {proc.returncode}); see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise MRCError(f"the reward service was not ready after {startup_timeout:.0f} s; see {log_path}")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_demo(out_dir: Path, *, epochs: int = 4, policy_path: str | None = None, progress: bool = True) -> Path:
    """Service + short finetuning; returns the report's path."""
    from .trainer import Trainer

    out_dir.mkdir(parents=True, exist_ok=True)
    with reward_service(out_dir / "reward-service.log") as url:
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
