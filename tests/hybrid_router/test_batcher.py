"""DynamicBatcher: batches form under concurrency, every request gets its own rows, the queue is bounded."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from hybrid_router.batcher import BatchConfig, BatchStats, DynamicBatcher, QueueFull


def _run_with(config: BatchConfig, n_requests: int, rows: int = 1, gate: threading.Event | None = None):
    stats: list[BatchStats] = []

    def model(x: np.ndarray) -> np.ndarray:
        if gate is not None:
            gate.wait(5)
        return x.reshape(len(x), -1).sum(axis=1, keepdims=True) * 2

    async def main():
        b = DynamicBatcher(model, config, on_batch=stats.append)
        await b.start()
        xs = [np.full((rows, 3), i, dtype=np.float32) for i in range(n_requests)]
        outs = await asyncio.gather(*(b.submit(x) for x in xs), return_exceptions=True)
        await b.stop()
        return xs, outs

    xs, outs = asyncio.run(main())
    return xs, outs, stats


def test_concurrent_requests_are_batched_and_answered_with_their_own_rows() -> None:
    xs, outs, stats = _run_with(BatchConfig(max_batch=16, max_delay_us=20_000), 64)
    for x, out in zip(xs, outs):
        np.testing.assert_array_equal(out, x.sum(axis=1, keepdims=True) * 2)
    assert sum(s.rows for s in stats) == 64
    assert max(s.rows for s in stats) == 16
    assert len(stats) < 64 / 2


def test_max_batch_one_is_request_by_request() -> None:
    _, outs, stats = _run_with(BatchConfig(max_batch=1, max_delay_us=20_000), 10)
    assert [s.rows for s in stats] == [1] * 10


def test_multi_row_requests_are_not_split() -> None:
    xs, outs, stats = _run_with(BatchConfig(max_batch=8, max_delay_us=5_000), 10, rows=3)
    assert all(s.rows % 3 == 0 and s.rows <= 8 for s in stats)
    assert all(o.shape == (3, 1) for o in outs)


def test_a_lone_request_waits_at_most_the_delay() -> None:
    _, _, stats = _run_with(BatchConfig(max_batch=32, max_delay_us=1_000), 1)
    assert stats[0].rows == 1
    assert stats[0].queue_wait_s < 0.5


def test_full_queue_refuses_at_once() -> None:
    gate = threading.Event()

    async def main():
        b = DynamicBatcher(lambda x: (gate.wait(5), x)[1], BatchConfig(max_batch=1, max_delay_us=0, max_queue=2))
        await b.start()
        first = asyncio.ensure_future(b.submit(np.zeros((1, 1))))
        await asyncio.sleep(0.05)  # the worker took it and blocks in the model
        queued = [asyncio.ensure_future(b.submit(np.zeros((1, 1)))) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await b.submit(np.zeros((1, 1)))
        assert b.depth == 2
        gate.set()
        await asyncio.gather(first, *queued)
        await b.stop()

    asyncio.run(main())


def test_a_failing_model_fails_its_batch_not_the_worker() -> None:
    calls = {"n": 0}

    def flaky(x: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return x

    async def main():
        b = DynamicBatcher(flaky, BatchConfig(max_batch=1, max_delay_us=0))
        await b.start()
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(np.zeros((1, 1)))
        out = await b.submit(np.ones((1, 1)))
        await b.stop()
        return out

    assert asyncio.run(main())[0, 0] == 1
