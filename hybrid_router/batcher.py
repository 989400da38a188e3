"""Dynamic batching for the cloud server: many small requests, one model call.

Requests wait in a bounded queue. A single worker takes the oldest request and adds queued
ones until the batch holds ``max_batch`` rows or the oldest has waited ``max_delay_us``
(Triton's ``max_queue_delay_microseconds``), then runs the model once on a dedicated thread
and hands each request its rows. While a batch runs, the next one fills up, so under load
batches form without waiting. A full queue refuses at once (``QueueFull``), which the server
turns into 429 with Retry-After. ``max_batch=1`` is request-by-request serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BatchConfig", "BatchStats", "DynamicBatcher", "QueueFull", "ShuttingDown"]


class QueueFull(Exception):
    """The request queue is at its bound; the caller should retry later."""


class ShuttingDown(Exception):
    """The batcher stopped before the request ran."""


@dataclass(frozen=True)
class BatchConfig:
    """How batches form."""

    max_batch: int = 32
    max_delay_us: int = 2000
    max_queue: int = 1024

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_delay_us < 0:
            raise ValueError("max_batch and max_queue must be >= 1, max_delay_us >= 0")


@dataclass(frozen=True)
class BatchStats:
    """What one model call did (for metrics)."""

    rows: int
    requests: int
    queue_wait_s: float
    run_s: float


@dataclass
class _Pending:
    x: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Collects requests into batches and runs ``run(batch) -> outputs`` on one worker thread."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], config: BatchConfig | None = None, *,
                 on_batch: Callable[[BatchStats], None] | None = None) -> None:
        self.config = config or BatchConfig()
        self._run = run
        self._on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher")

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch being run)."""
        return len(self._queue)

    async def start(self) -> None:
        """Start the worker on the running event loop."""
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="dynamic-batcher")

    async def stop(self) -> None:
        """Stop the worker; requests still queued fail."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(ShuttingDown("server shutting down"))
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run_direct(self, x: np.ndarray) -> np.ndarray:
        """Run the model on the worker thread outside the queue (warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._run, x)

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """The outputs for ``x`` (a batch of one or more rows); raises QueueFull when the queue is at its bound."""
        if len(self._queue) >= self.config.max_queue:
            raise QueueFull(f"{len(self._queue)} requests queued (max {self.config.max_queue})")
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(x, fut))
        assert self._wake is not None, "start() the batcher first"
        self._wake.set()
        return await fut

    async def _next_batch(self) -> list[_Pending]:
        while not self._queue:
            self._wake.clear()
            await self._wake.wait()
        first = self._queue.popleft()
        batch, rows = [first], len(first.x)
        deadline = first.enqueued + self.config.max_delay_us / 1e6
        while rows < self.config.max_batch:
            if self._queue:
                if rows + len(self._queue[0].x) > self.config.max_batch:
                    break
                p = self._queue.popleft()
                batch.append(p)
                rows += len(p.x)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # wait for the next arrival or the deadline; a timer that sets the event is much cheaper than
            # asyncio.wait_for, which creates a task per wait (once per arriving request under load)
            self._wake.clear()
            timer = asyncio.get_running_loop().call_later(left, self._wake.set)
            await self._wake.wait()
            timer.cancel()
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            batch = [p for p in batch if not p.future.done()]  # the client went away
            if not batch:
                continue
            x = batch[0].x if len(batch) == 1 else np.concatenate([p.x for p in batch])
            t0 = time.monotonic()
            try:
                out = await loop.run_in_executor(self._pool, self._run, x)
            except Exception as e:  # noqa: BLE001 - one bad batch must not stop the worker
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            run_s = time.monotonic() - t0
            start = 0
            for p in batch:
                n = len(p.x)
                if not p.future.done():
                    p.future.set_result(out[start : start + n])
                start += n
            if self._on_batch is not None:
                self._on_batch(BatchStats(len(x), len(batch), t0 - batch[0].enqueued, run_s))
