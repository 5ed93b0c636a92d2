"""Dynamic batching: grids from many requests are scored together.

Requests append grids to one queue; a collector takes every grid already
waiting (up to ``max_batch``), waits at most ``max_delay`` for more when the
batch is not full, and hands the batch to a single worker thread, so the
event loop never blocks and the device runs one batch at a time. Grids of
different sizes never share a batch. The queue is bounded in grids
(``max_queue``) and in pixels (``max_queue_pixels``): a full queue is refused
at once (the caller answers 503) instead of letting requests time out, and a
request that could never fit is refused as too large (413); a batch that raises
is split in halves until the failing grid is isolated, so one bad grid (or an
out-of-memory batch) fails only itself.

Engines that batch across requests themselves (Triton) get a
:class:`PassThroughBatcher` instead: each request's grids go straight to the
engine, with the same queue limit, drain and failure isolation.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..scores import GridScore
from .memory import release_memory
from .metrics import ServiceMetrics

log = logging.getLogger("carve3d_reward.service")

#: After this long with nothing to score, memory freed by the last batches is handed back to the OS.
IDLE_RELEASE_S = 1.0

#: ``(grids [B, H, W, 3] uint8, return_renders) -> one score per grid``.
ScoreFn = Callable[[np.ndarray, bool], list[GridScore]]
#: The same, as a coroutine (engines that wait on the network instead of computing).
AsyncScoreFn = Callable[[np.ndarray, bool], Awaitable[list[GridScore]]]


class AsyncEngine(Protocol):
    """A remote engine that batches across requests itself (Triton): an :data:`AsyncScoreFn` plus a lifecycle."""

    #: Whether ``return_renders`` can be honoured (the gateway answers 400 otherwise).
    supports_renders: bool

    async def __call__(self, grids: np.ndarray, want_renders: bool) -> list[GridScore]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> tuple[bool, str]:
        """``(True, "")`` when requests can be scored now, else ``(False, why)``."""
        ...


class EngineUnavailableError(Exception):
    """The engine cannot be reached or is not ready; the whole request is answered 503 with Retry-After."""

    def __init__(self, detail: str, retry_after: float = 2.0) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class QueueFullError(Exception):
    """The queue cannot take the request now; retry after ``retry_after`` seconds."""

    def __init__(self, depth: int, retry_after: float) -> None:
        super().__init__(f"the scoring queue is full ({depth} grids waiting); retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class RequestTooLargeError(Exception):
    """The request alone holds more grids or pixels than the queue ever takes: retrying cannot help."""


class EngineClosedError(Exception):
    """The engine is shutting down and takes no new work."""


class ScoringError(Exception):
    """Scoring this grid raised even in a batch of one."""


class _QueueLimits:
    """Admission to a queue bounded in grids and pixels; ``seconds_per_grid`` feeds Retry-After."""

    def __init__(self, max_queue: int, max_queue_pixels: int) -> None:
        self.max_queue = max_queue
        self.max_queue_pixels = max_queue_pixels
        self.grids = 0
        self.pixels = 0
        self.seconds_per_grid = 0.1  # running estimate

    def admit(self, grids: list[np.ndarray]) -> int:
        """Count ``grids`` in, or raise :class:`RequestTooLargeError` / :class:`QueueFullError`; their pixels."""
        pixels = sum(g.shape[0] * g.shape[1] for g in grids)
        if len(grids) > self.max_queue or pixels > self.max_queue_pixels:
            raise RequestTooLargeError(
                f"{len(grids)} grids of {pixels} pixels in all can never fit the scoring queue "
                f"({self.max_queue} grids, {self.max_queue_pixels} pixels); send fewer or smaller grids"
            )
        if self.grids + len(grids) > self.max_queue or self.pixels + pixels > self.max_queue_pixels:
            raise QueueFullError(self.grids, max(1.0, round(self.grids * self.seconds_per_grid)))
        self.grids += len(grids)
        self.pixels += pixels
        return pixels

    def release(self, grids: int, pixels: int) -> None:
        self.grids -= grids
        self.pixels -= pixels

    def observe(self, seconds: float, grids: int) -> None:
        self.seconds_per_grid = 0.8 * self.seconds_per_grid + 0.2 * seconds / grids


@dataclass
class _Item:
    grid: np.ndarray
    want_renders: bool
    future: asyncio.Future[GridScore]
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def pixels(self) -> int:
        return self.grid.shape[0] * self.grid.shape[1]


class DynamicBatcher:
    """Gathers grids into batches and scores them on one worker thread."""

    def __init__(
        self,
        score_fn: ScoreFn,
        *,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        max_queue_pixels: int = 1 << 62,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._score_fn = score_fn
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.limits = _QueueLimits(max_queue, max_queue_pixels)
        self.metrics = metrics
        self._items: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrc-engine")
        self._task: asyncio.Task[None] | None = None
        self._closing = False

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

    async def submit(self, grids: list[np.ndarray], want_renders: bool = False) -> list[GridScore | ScoringError]:
        """Score ``grids`` (each ``[H, W, 3]``); results in the same order.

        A grid that fails even alone comes back as its :class:`ScoringError`;
        the others are unaffected.
        """
        if self._closing or self._task is None:
            raise EngineClosedError("the scoring engine is shutting down")
        self.limits.admit(grids)
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
                item = self._pop()
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
                await self._run(batch)

    async def _next_batch(self) -> list[_Item] | None:
        loop = asyncio.get_running_loop()
        scored_since_release = True
        while not self._items:
            if self._closing:
                return None
            self._wakeup.clear()
            try:  # idle for a while after scoring: hand the batches' freed memory back to the OS, once
                await asyncio.wait_for(self._wakeup.wait(), IDLE_RELEASE_S if scored_since_release else None)
            except TimeoutError:
                await loop.run_in_executor(self._executor, release_memory)
                scored_since_release = False
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
                self.limits.release(1, item.pixels)
                continue
            if item.grid.shape == shape:
                self.limits.release(1, item.pixels)
                batch.append(item)
            else:
                keep.append(item)
        self._items.extendleft(reversed(keep))
        self._update_depth()
        return batch

    def _pop(self) -> _Item:
        item = self._items.popleft()
        self.limits.release(1, item.pixels)
        return item

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
        except Exception as exc:
            if self.metrics is not None:
                self.metrics.batch_failures.inc()
            if len(batch) == 1:
                log.warning("scoring failed for one grid", exc_info=exc)
                if not batch[0].future.done():
                    batch[0].future.set_exception(ScoringError(str(exc) or "the scoring function raised"))
                return
            log.warning("a batch of %d failed (%s); retrying it in halves", len(batch), exc)
            half = len(batch) // 2
            await self._run(batch[:half])
            await self._run(batch[half:])
            return
        elapsed = time.perf_counter() - start
        self.limits.observe(elapsed, len(batch))
        if self.metrics is not None:
            self.metrics.compute_seconds.observe(elapsed)
            self.metrics.batch_size.observe(len(batch))
        for it, result in zip(batch, results, strict=True):
            if not it.future.done():
                if not it.want_renders:
                    result = result.without_renders()
                it.future.set_result(result)

    def _update_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._items))


class PassThroughBatcher:
    """The :class:`DynamicBatcher` interface for an engine that batches across requests itself.

    A request's grids are sent at once, one engine call per grid size (in
    parallel); nothing waits to be gathered here. ``max_queue`` and
    ``max_queue_pixels`` cap the grids in flight (beyond them:
    :class:`QueueFullError`, or :class:`RequestTooLargeError` for a request
    that could never fit), a failing call is split in
    halves down to the failing grid (:class:`ScoringError`), and
    :class:`EngineUnavailableError` fails the whole request, to be answered 503.
    """

    def __init__(
        self,
        score_fn: AsyncScoreFn,
        *,
        max_queue: int,
        max_queue_pixels: int = 1 << 62,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._score_fn = score_fn
        self.limits = _QueueLimits(max_queue, max_queue_pixels)
        self.metrics = metrics
        self._idle = asyncio.Event()
        self._idle.set()
        self._started = False
        self._closing = False

    @property
    def depth(self) -> int:
        """Grids sent to the engine and not yet answered."""
        return self.limits.grids

    @property
    def running(self) -> bool:
        return self._started and not self._closing

    async def start(self) -> None:
        self._started = True

    async def submit(self, grids: list[np.ndarray], want_renders: bool = False) -> list[GridScore | ScoringError]:
        if self._closing or not self._started:
            raise EngineClosedError("the scoring engine is shutting down")
        pixels = self.limits.admit(grids)
        self._changed()
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, g in enumerate(grids):
            groups.setdefault(g.shape, []).append(i)
        try:
            scored = await asyncio.gather(
                *(self._run(np.stack([grids[i] for i in idx]), want_renders) for idx in groups.values())
            )
        finally:
            self.limits.release(len(grids), pixels)
            self._changed()
        results: list[GridScore | ScoringError] = [ScoringError("not scored")] * len(grids)
        for idx, group in zip(groups.values(), scored, strict=True):
            for i, res in zip(idx, group, strict=True):
                if isinstance(res, GridScore) and not want_renders:
                    res = res.without_renders()
                results[i] = res
        return results

    async def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking work; with ``drain``, wait (up to ``timeout``) for the calls in flight."""
        self._closing = True
        if drain:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                log.warning("%d grids still in flight after the drain timeout", self.limits.grids)

    async def _run(self, grids: np.ndarray, want_renders: bool) -> list[GridScore | ScoringError]:
        start = time.perf_counter()
        try:
            results = await self._score_fn(grids, want_renders)
            if len(results) != len(grids):
                raise RuntimeError(f"the engine answered {len(results)} results for {len(grids)} grids")
        except EngineUnavailableError:
            raise
        except Exception as exc:
            if self.metrics is not None:
                self.metrics.batch_failures.inc()
            if len(grids) == 1:
                log.warning("scoring failed for one grid", exc_info=exc)
                return [ScoringError(str(exc) or "the scoring function raised")]
            log.warning("a batch of %d failed (%s); retrying it in halves", len(grids), exc)
            half = len(grids) // 2
            first, second = await asyncio.gather(
                self._run(grids[:half], want_renders), self._run(grids[half:], want_renders)
            )
            return [*first, *second]
        elapsed = time.perf_counter() - start
        self.limits.observe(elapsed, len(grids))
        if self.metrics is not None:
            self.metrics.compute_seconds.observe(elapsed)
            self.metrics.batch_size.observe(len(grids))
        return list(results)

    def _changed(self) -> None:
        if self.limits.grids:
            self._idle.clear()
        else:
            self._idle.set()
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.limits.grids)
