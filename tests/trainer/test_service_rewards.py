"""The trainer against a live reward service: a crash and restart mid-epoch loses and double-counts nothing."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from concurrent.futures import Future

import httpx
import pytest
from torch import Tensor

from carve3d_reward.scores import GridScore
from carve3d_trainer.config import RewardConfig
from carve3d_trainer.rewards import ServiceRewards

from ..serving import free_port, serve_process
from .test_trainer import make_trainer

SERVE_ARGS = ("--view-size", "16", "--carve-resolution", "24", "--carve-samples", "48", "--max-delay-ms", "1")


def scored(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith('mrc_grids_scored_total{status="ok"}'):
            return float(line.split()[1])
    return 0.0


@pytest.mark.slow
def test_service_restart_mid_epoch_scores_every_sample_once(tmp_path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stack = contextlib.ExitStack()
    first_url, first = stack.enter_context(serve_process(*SERVE_ARGS, port=port))
    counts: dict[str, float] = {}
    restarted = threading.Event()

    class CrashAfterFirstBatch(ServiceRewards):
        """Kills the service once the first batch is scored, restarts it 2 s later on the same port."""

        calls = 0

        def submit(self, images: Tensor, request_id: str, *, renders: bool = False) -> Future[list[GridScore]]:
            future = super().submit(images, request_id, renders=renders)
            self.calls += 1
            if self.calls == 1:
                future.result(timeout=60)
                counts["first"] = scored(first_url)
                first.send_signal(signal.SIGKILL)
                first.wait(timeout=30)

                def restart() -> None:
                    time.sleep(2.0)
                    stack.enter_context(serve_process(*SERVE_ARGS, port=port))
                    restarted.set()

                threading.Thread(target=restart, daemon=True).start()
            return future

    rewards = CrashAfterFirstBatch(RewardConfig(url=url, timeout_s=20, deadline_s=120, retries=30))
    trainer = make_trainer(tmp_path, rewards=rewards, samples_per_epoch=12, sample_batch_size=4)
    try:
        traj, results = trainer.sample_round(0)
        assert restarted.wait(timeout=60)
        assert len(results) == len(traj) == 12
        assert all(r.ok and r.mrc is not None for r in results)
        assert counts["first"] == 4  # the first server scored the first batch ...
        assert scored(url) == 8  # ... and the restarted one exactly the two batches it had not answered
        assert len({r.request_id for r in results}) == 3  # one id per batch, kept across retries
    finally:
        trainer.close()
        stack.close()


def test_dead_service_fails_clearly_within_the_deadline(tmp_path) -> None:
    """Nothing listening: the run ends with a clear error instead of hanging.

    The deadline (3 s), not the retries (50, minutes of backoff), ends it: the client's own clock says so,
    so a busy machine cannot fail the test (and the test's timeout stands for a hang).
    """
    from carve3d_reward.client import MRCUnavailableError

    url = f"http://127.0.0.1:{free_port()}"
    rewards = ServiceRewards(RewardConfig(url=url, timeout_s=1, deadline_s=3, retries=50))
    trainer = make_trainer(tmp_path, rewards=rewards, samples_per_epoch=4, sample_batch_size=4)
    try:
        with pytest.raises(MRCUnavailableError, match="attempts") as failure:
            trainer.sample_round(0)
    finally:
        trainer.close()
    assert "deadline of 3 s reached" in str(failure.value) and failure.value.attempts <= 50
