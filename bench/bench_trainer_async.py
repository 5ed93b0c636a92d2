"""How much of an epoch the trainer spends waiting for rewards: asynchronous vs synchronous scoring.

The demo setup: the reward service (``mrc serve``, embedded default metric) on
loopback and the small CPU model. Asynchronous scoring (the trainer's
behaviour) sends each sampled batch to the service and samples the next one
while it is scored; synchronous scoring waits for every batch before sampling
the next. Both run side by side in one process, same seeds, same epochs.

    .venv/bin/python bench/bench_trainer_async.py [--epochs 2] [--samples 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

from torch import Tensor

from carve3d_reward.scores import GridScore
from carve3d_reward.service.launch import serve_subprocess
from carve3d_trainer.config import load_config
from carve3d_trainer.demo import DEMO_SERVICE_ARGS
from carve3d_trainer.rewards import ServiceRewards
from carve3d_trainer.trainer import Trainer


class SynchronousRewards(ServiceRewards):
    """Waits for each batch's scores before returning: no overlap with sampling."""

    def submit(self, images: Tensor, request_id: str, *, renders: bool = False) -> Future[list[GridScore]]:
        future = super().submit(images, request_id, renders=renders)
        start = time.perf_counter()
        future.result()
        self.wait_seconds += time.perf_counter() - start
        return future


def measure(url: str, run_dir: Path, rewards_cls: type[ServiceRewards], epochs: int, samples: int) -> dict[str, float]:
    config = load_config(
        None,
        {
            "run_dir": str(run_dir),
            "epochs": epochs + 1,
            "samples_per_epoch": samples,
            "sample_batch_size": 4,
            "eval_every": 0,
            "policy.num_steps": 10,
            "algorithm.warmup_epochs": 0,
            "reward.url": url,
        },
    )
    trainer = Trainer(config, rewards=rewards_cls(config.reward), progress=False)
    try:
        trainer.run_epoch(0)  # warm-up: first-call costs out of the measurement
        wait0 = trainer.rewards.wait_seconds
        start = time.perf_counter()
        for epoch in range(1, epochs + 1):
            trainer.run_epoch(epoch)
        total = time.perf_counter() - start
        wait = trainer.rewards.wait_seconds - wait0
    finally:
        trainer.close()
    return {"epoch_s": total / epochs, "wait_s": wait / epochs, "wait_fraction": wait / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument(
        "--reward-view-size",
        type=int,
        default=None,
        help="score at this view size instead of the demo's 32 px (a slower reward, as with larger models)",
    )
    args = parser.parse_args()
    service_args = list(DEMO_SERVICE_ARGS)
    if args.reward_view_size:
        service_args[service_args.index("--view-size") + 1] = str(args.reward_view_size)
    with tempfile.TemporaryDirectory() as tmp, serve_subprocess(*service_args) as (url, _):
        rows = {
            "asynchronous": measure(url, Path(tmp) / "a", ServiceRewards, args.epochs, args.samples),
            "synchronous": measure(url, Path(tmp) / "s", SynchronousRewards, args.epochs, args.samples),
        }
    view = args.reward_view_size or 32
    print(
        f"reward waiting per epoch, demo setup ({args.samples} samples/epoch, {args.epochs} epochs, CPU, "
        f"rewards scored at {view} px views)"
    )
    print(f"{'scoring':<13} {'epoch s':>8} {'waiting s':>10} {'waiting share':>14}")
    for name, r in rows.items():
        print(f"{name:<13} {r['epoch_s']:>8.2f} {r['wait_s']:>10.2f} {100 * r['wait_fraction']:>13.1f}%")
    a, s = rows["asynchronous"], rows["synchronous"]
    print(
        f"waiting: asynchronous/synchronous = {a['wait_s'] / max(s['wait_s'], 1e-9):.2f}; "
        f"epoch time: asynchronous/synchronous = {a['epoch_s'] / s['epoch_s']:.2f}"
    )


if __name__ == "__main__":
    main()
