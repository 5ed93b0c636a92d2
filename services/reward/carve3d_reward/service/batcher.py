"""Dynamic batching: grids from many requests are scored together.

Requests append grids to one queue; a collector takes every grid already
waiting (up to ``max_batch``), waits at most ``max_delay`` for more when the
batch is not full, and hands the batch to a single worker thread, so the
event loop never blocks and the device runs one batch at a time. Grids of
different sizes never share a batch. A full queue is refused at once (the
caller answers 503) instead of letting requests time out; a batch that raises
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
from typing import Any, Protocol

import numpy as np

from .metrics import ServiceMetrics

log = logging.getLogger("carve3d_reward.service")

#: ``(grids [B, H, W, 3] uint8, return_renders) -> one result dict per grid``.
ScoreFn = Callable[[np.ndarray, bool], list[dict[str, Any]]]
#: The same, as a coroutine (engines that wait on the network instead of computing).
AsyncScoreFn = Callable[[np.ndarray, bool], Awaitable[list[dict[str, Any]]]]


class AsyncEngine(Protocol):
    """A remote engine that batches across requests itself (Triton): an :data:`AsyncScoreFn` plus a lifecycle."""

    #: Whether ``return_renders`` can be honoured (the gateway answers 400 otherwise).
    supports_renders: bool

    async def __call__(self, grids: np.ndarray, want_renders: bool) -> list[dict[str, Any]]: ...

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


class PassThroughBatcher:
    """The :class:`DynamicBatcher` interface for an engine that batches across requests itself.

    A request's grids are sent at once, one engine call per grid size (in
    parallel); nothing waits to be gathered here. ``max_queue`` caps the grids
    in flight (beyond it: :class:`QueueFullError`), a failing call is split in
    halves down to the failing grid (:class:`ScoringError`), and
    :class:`EngineUnavailableError` fails the whole request, to be answered 503.
    """

    def __init__(self, score_fn: AsyncScoreFn, *, max_queue: int, metrics: ServiceMetrics | None = None) -> None:
        self._score_fn = score_fn
        self.max_queue = max_queue
        self.metrics = metrics
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._started = False
        self._closing = False
        self._seconds_per_grid = 0.1

    @property
    def depth(self) -> int:
        """Grids sent to the engine and not yet answered."""
        return self._in_flight

    @property
    def running(self) -> bool:
        return self._started and not self._closing

    async def start(self) -> None:
        self._started = True

    async def submit(self, grids: list[np.ndarray], want_renders: bool = False) -> list[dict[str, Any] | ScoringError]:
        if self._closing or not self._started:
            raise EngineClosedError("the scoring engine is shutting down")
        if self._in_flight + len(grids) > self.max_queue:
            raise QueueFullError(self._in_flight, max(1.0, round(self._in_flight * self._seconds_per_grid)))
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, g in enumerate(grids):
            groups.setdefault(g.shape, []).append(i)
        self._add(len(grids))
        try:
            scored = await asyncio.gather(
                *(self._run(np.stack([grids[i] for i in idx]), want_renders) for idx in groups.values())
            )
        finally:
            self._add(-len(grids))
        results: list[dict[str, Any] | ScoringError] = [ScoringError("not scored")] * len(grids)
        for idx, group in zip(groups.values(), scored, strict=True):
            for i, res in zip(idx, group, strict=True):
                if isinstance(res, dict) and not want_renders:
                    res = {k: v for k, v in res.items() if k != "renders"}
                results[i] = res
        return results

    async def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking work; with ``drain``, wait (up to ``timeout``) for the calls in flight."""
        self._closing = True
        if drain:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                log.warning("%d grids still in flight after the drain timeout", self._in_flight)

    async def _run(self, grids: np.ndarray, want_renders: bool) -> list[dict[str, Any] | ScoringError]:
        start = time.perf_counter()
        try:
            results = await self._score_fn(grids, want_renders)
            if len(results) != len(grids):
                raise RuntimeError(f"the engine answered {len(results)} results for {len(grids)} grids")
        except EngineUnavailableError:
            raise
        except Exception as exc:  # noqa: BLE001 - isolate the failing grid, never lose the others
            if self.metrics is not None:
                self.metrics.batch_failures.inc()
            if len(grids) == 1:
                log.warning("scoring failed for one grid: %s", exc)
                return [ScoringError(f"{type(exc).__name__}: {exc}")]
            log.warning("a batch of %d failed (%s); retrying it in halves", len(grids), exc)
            half = len(grids) // 2
            first, second = await asyncio.gather(
                self._run(grids[:half], want_renders), self._run(grids[half:], want_renders)
            )
            return [*first, *second]
        elapsed = time.perf_counter() - start
        self._seconds_per_grid = 0.8 * self._seconds_per_grid + 0.2 * elapsed / len(grids)
        if self.metrics is not None:
            self.metrics.compute_seconds.observe(elapsed)
            self.metrics.batch_size.observe(len(grids))
        return list(results)

    def _add(self, n: int) -> None:
        self._in_flight += n
        if self._in_flight:
            self._idle.clear()
        else:
            self._idle.set()
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._in_flight)
