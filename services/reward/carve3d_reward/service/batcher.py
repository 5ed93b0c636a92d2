"""Dynamic batching: grids from many requests are scored together.

Requests append grids to one queue; a collector takes every grid already
waiting (up to ``max_batch``), waits at most ``max_delay`` for more when the
batch is not full, and hands the batch to a single worker thread, so the
event loop never blocks and the device runs one batch at a time. Grids of
different sizes never share a batch. A full queue is refused at once (the
caller answers 503) instead of letting requests time out; a batch that raises
is split in halves until the failing grid is isolated, so one bad grid (or an
out-of-memory batch) fails only itself.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .metrics import ServiceMetrics

log = logging.getLogger("carve3d_reward.service")

#: ``(grids [B, H, W, 3] uint8, return_renders) -> one result dict per grid``.
ScoreFn = Callable[[np.ndarray, bool], list[dict[str, Any]]]


class QueueFullError(Exception):
    """The queue cannot take the request now; retry after ``retry_after`` seconds."""

    def __init__(self, depth: int, retry_after: float) -> None:
        super().__init__(f"the scoring queue is full ({depth} grids waiting); retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class EngineClosedError(Exception):
    """The engine is shutting down and takes no new work."""


class ScoringError(Exception):
    """Scoring this grid raised even in a batch of one."""


@dataclass
class _Item:
    grid: np.ndarray
    want_renders: bool
    future: asyncio.Future[dict[str, Any]]
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Gathers grids into batches and scores them on one worker thread."""

    def __init__(
        self,
        score_fn: ScoreFn,
        *,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._score_fn = score_fn
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._items: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrc-engine")
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._busy = False
        self._seconds_per_grid = 0.1  # running estimate, for Retry-After

    # -- public ---------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Grids waiting (not counting the batch being scored)."""
        return len(self._items)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    async def start(self) -> None:
        self._task = asyncio.create_task(self._collect(), name="mrc-batcher")

    async def submit(self, grids: list[np.ndarray], want_renders: bool = False) -> list[dict[str, Any] | ScoringError]:
        """Score ``grids`` (each ``[H, W, 3]``); results in the same order.

        A grid that fails even alone comes back as its :class:`ScoringError`;
        the others are unaffected.
        """
        if self._closing or self._task is None:
            raise EngineClosedError("the scoring engine is shutting down")
        if self.depth + len(grids) > self.max_queue:
            retry = max(1.0, round(self.depth * self._seconds_per_grid))
            raise QueueFullError(self.depth, retry)
        loop = asyncio.get_running_loop()
        items = [_Item(g, want_renders, loop.create_future()) for g in grids]
        self._items.extend(items)
        self._update_depth()
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(it.future for it in items), return_exceptions=True))
        except BaseException:
            for it in items:  # a timed-out or cancelled request frees its queue slots
                it.future.cancel()
            raise

    async def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking work; with ``drain``, finish what is queued first."""
        self._closing = True
        self._wakeup.set()
        if not drain:
            while self._items:
                item = self._items.popleft()
                if not item.future.done():
                    item.future.set_exception(EngineClosedError("the scoring engine stopped"))
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except TimeoutError:
                self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- collector ------------------------------------------------------------------------------------
    async def _collect(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            if batch:
                self._busy = True
                try:
                    await self._run(batch)
                finally:
                    self._busy = False

    async def _next_batch(self) -> list[_Item] | None:
        loop = asyncio.get_running_loop()
        while not self._items:
            if self._closing:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = loop.time() + self.max_delay_s
        while len(self._items) < self.max_batch and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        shape = self._items[0].grid.shape
        batch, keep = [], collections.deque()
        while self._items and len(batch) < self.max_batch:
            item = self._items.popleft()
            if item.future.done():  # its request timed out or was cancelled
                continue
            (batch if item.grid.shape == shape else keep).append(item)
        self._items.extendleft(reversed(keep))
        self._update_depth()
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        batch = [it for it in batch if not it.future.done()]
        if not batch:
            return
        start = time.perf_counter()
        if self.metrics is not None:
            for it in batch:
                self.metrics.queue_seconds.observe(start - it.enqueued)
        grids = np.stack([it.grid for it in batch])
        want = any(it.want_renders for it in batch)
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._score_fn, grids, want)
        except Exception as exc:  # noqa: BLE001 - isolate the failing grid, never lose the others
            if self.metrics is not None:
                self.metrics.batch_failures.inc()
            if len(batch) == 1:
                log.warning("scoring failed for one grid: %s", exc)
                if not batch[0].future.done():
                    batch[0].future.set_exception(ScoringError(f"{type(exc).__name__}: {exc}"))
                return
            log.warning("a batch of %d failed (%s); retrying it in halves", len(batch), exc)
            half = len(batch) // 2
            await self._run(batch[:half])
            await self._run(batch[half:])
            return
        elapsed = time.perf_counter() - start
        self._seconds_per_grid = 0.8 * self._seconds_per_grid + 0.2 * elapsed / len(batch)
        if self.metrics is not None:
            self.metrics.compute_seconds.observe(elapsed)
            self.metrics.batch_size.observe(len(batch))
        for it, result in zip(batch, results, strict=True):
            if not it.future.done():
                if not it.want_renders:
                    result = {k: v for k, v in result.items() if k != "renders"}
                it.future.set_result(result)

    def _update_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._items))
