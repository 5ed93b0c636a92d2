"""Rewards for the trainer, always scored asynchronously.

``submit`` hands a batch of images to the scorer and returns at once with a
future, so batch k is scored while batch k+1 is being sampled; the epoch then
waits only for what is still missing. Two backends:

* :class:`ServiceRewards` (default): the reward service through
  :class:`carve3d_reward.client.AsyncMRCClient` on a background event loop.
  Every batch has a deterministic request id, so a retry after a timeout or a
  service restart is never scored twice into a result; a service that stays
  down past the deadline ends the run with a clear error instead of hanging.
* :class:`InProcessRewards`: the metric in this process, on a worker thread
  (single-process runs without a service).
"""

from __future__ import annotations

import asyncio
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor

from torch import Tensor

from carve3d_reward.client import AsyncMRCClient
from carve3d_reward.pixels import to_uint8
from carve3d_reward.scores import GridScore

from .config import RewardConfig


class RewardBackend(ABC):
    """Scores image batches in the background."""

    #: Seconds the trainer spent waiting for results (for the logs).
    wait_seconds: float = 0.0

    @abstractmethod
    def submit(self, images: Tensor, request_id: str, *, renders: bool = False) -> Future[list[GridScore]]:
        """Start scoring ``images [B, 3, H, W]`` in ``[0, 1]``; one result per image, in order.

        With ``renders`` the results also carry each view's re-render (PNG), for sheets.
        """

    def collect(self, futures: list[Future[list[GridScore]]]) -> list[GridScore]:
        """Wait for every batch (in order) and concatenate."""
        start = time.perf_counter()
        try:
            return [r for f in futures for r in f.result()]
        finally:
            self.wait_seconds += time.perf_counter() - start

    def metric_id(self) -> str:
        return ""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> RewardBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_uint8_grids(images: Tensor) -> Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> ``uint8 [B, H, W, 3]`` on the CPU (lossless wire format)."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu()  # quantised where it lives: a quarter of the bytes to copy


class ServiceRewards(RewardBackend):
    """The reward service, through the async client on a private event loop thread."""

    def __init__(self, config: RewardConfig) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="reward-client", daemon=True)
        self._thread.start()
        token = config.token.get_secret_value() if config.token else None
        self._client = AsyncMRCClient(
            config.url, token=token, timeout=config.timeout_s, deadline=config.deadline_s, retries=config.retries
        )

    def submit(self, images: Tensor, request_id: str, *, renders: bool = False) -> Future[list[GridScore]]:
        grids = to_uint8_grids(images).numpy()
        call = self._client.score(grids, request_id=request_id, return_renders=renders)
        return asyncio.run_coroutine_threadsafe(call, self._loop)

    def metric_id(self) -> str:
        info = asyncio.run_coroutine_threadsafe(self._client.info(), self._loop).result()
        return str(info.get("metric", ""))

    def close(self) -> None:
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


class InProcessRewards(RewardBackend):
    """The metric itself, on one worker thread (no service needed)."""

    def __init__(self, config: RewardConfig) -> None:
        from carve3d_reward.model import MRCModel

        self.model = MRCModel(config.metric)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    def _score(self, grids: Tensor, renders: bool) -> list[GridScore]:
        return self.model.score_grids(grids, return_renders=renders)

    def submit(self, images: Tensor, request_id: str, *, renders: bool = False) -> Future[list[GridScore]]:
        return self._executor.submit(self._score, to_uint8_grids(images), renders)

    def metric_id(self) -> str:
        return self.model.metric_id

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def build_rewards(config: RewardConfig) -> RewardBackend:
    return ServiceRewards(config) if config.mode == "service" else InProcessRewards(config)
