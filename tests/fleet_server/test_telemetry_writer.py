"""The telemetry group-commit writer (fleet_server.writer): exactly-once over real HTTP, grouping, the
full queue's 503, and how a failed transaction reaches its waiters."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy.exc import IntegrityError

from fleet_server import writer as writer_mod
from fleet_server.errors import Unavailable
from fleet_server.schemas import TelemetryBatch
from fleet_server.writer import TelemetryWriter
from fleet_support import SimDevice, wait_for


def _minute(i: int) -> str:
    return f"2026-11-23T{i // 60:02d}:{i % 60:02d}:00Z"


def test_concurrent_posts_all_land_exactly_once(live_server):
    """Many devices post at once over real HTTP: every point is stored once, every dropped count once."""
    devices = [SimDevice(live_server, f"pi-g{i}").enroll() for i in range(12)]
    posts_per_device = 15
    jobs = []  # (device, first minute, points in the batch)
    for d in devices:
        minute = 0
        for k in range(posts_per_device):
            n = 1 + k % 4
            jobs.append((d, minute, n))
            minute += n
    local = threading.local()

    def post(job) -> int:  # noqa: ANN001
        d, first, n = job
        clients = local.__dict__.setdefault("clients", {})
        if d.token not in clients:
            clients[d.token] = httpx.Client(base_url=live_server.url, headers={"Authorization": f"Bearer {d.token}"}, timeout=60)
        body = {"points": [{"minute": _minute(first + j), "count": first + j, "model_version": d.device_id} for j in range(n)], "dropped": 1}
        r = clients[d.token].post("/v1/device/telemetry", json=body)
        assert r.status_code == 202, r.text
        assert r.json() == {"accepted": n}
        return n

    with ThreadPoolExecutor(48) as pool:
        accepted = sum(pool.map(post, jobs))
    expected = sum(n for _, _, n in jobs)
    assert accepted == expected
    for d in devices:
        got = live_server.admin.get("/v1/telemetry", params={"device_id": d.device_id, "limit": 10000}).json()
        minutes = Counter(p["minute"] for p in got["points"])
        want = sum(n for dd, _, n in jobs if dd is d)
        assert len(got["points"]) == want, f"{d.name}: {len(got['points'])} points stored, {want} posted"
        assert all(c == 1 for c in minutes.values()), f"{d.name}: duplicated points {[m for m, c in minutes.items() if c > 1]}"
        assert set(minutes) == {_minute(i) for i in range(want)}
        assert all(p["device_id"] == d.device_id and p["model_version"] == d.device_id for p in got["points"])
        assert got["dropped"] == posts_per_device
    everything = live_server.admin.get("/v1/telemetry", params={"limit": 10000}).json()
    assert len(everything["points"]) == expected and everything["dropped"] == len(jobs)


def _batch(n: int, dropped: int = 0) -> TelemetryBatch:
    return TelemetryBatch.model_validate({"points": [{"minute": _minute(i), "count": 1} for i in range(n)], "dropped": dropped})


class _Blocking:
    """Stands in for ``write_posts``: records each group, holds the first one until released, fails on request."""

    def __init__(self, fail=None) -> None:  # noqa: ANN001
        self.groups: list[list[str]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        self.fail = fail

    def __call__(self, db, posts) -> None:  # noqa: ANN001
        self.groups.append([p.device_id for p in posts])
        self.entered.set()
        self.release.wait(30)
        if self.fail is not None:
            self.fail(posts)


def test_posts_queued_behind_a_transaction_share_the_next_one(monkeypatch):
    fake = _Blocking()
    monkeypatch.setattr(writer_mod, "write_posts", fake)

    async def main() -> None:
        w = TelemetryWriter(None, max_pending_points=10_000)  # type: ignore[arg-type]
        w.start()
        first = asyncio.ensure_future(w.submit("d0", _batch(2)))
        await asyncio.to_thread(fake.entered.wait, 30)  # the writer holds d0's transaction open
        rest = [asyncio.ensure_future(w.submit(f"d{i}", _batch(1))) for i in range(1, 9)]
        await asyncio.sleep(0)
        assert not any(f.done() for f in [first, *rest])  # nobody is answered before the commit
        fake.release.set()
        assert await first == 2 and await asyncio.gather(*rest) == [1] * 8
        await asyncio.to_thread(w.stop)

    asyncio.run(main())
    assert fake.groups == [["d0"], [f"d{i}" for i in range(1, 9)]]  # one transaction for all eight queued posts


def test_a_full_queue_is_503_with_retry_after(start_fleet_server, monkeypatch):
    fake = _Blocking()
    real = writer_mod.write_posts
    monkeypatch.setattr(writer_mod, "write_posts", lambda db, posts: (fake(db, posts), real(db, posts)))
    server = start_fleet_server(telemetry_queue_points=1000)
    d = SimDevice(server, "pi-full").enroll()
    body = {"points": [{"minute": _minute(i), "count": 1} for i in range(1000)], "dropped": 0}

    def post() -> httpx.Response:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {d.token}"}, timeout=60) as c:
            return c.post("/v1/device/telemetry", json=body)

    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(post)  # taken by the writer, which is held
        assert fake.entered.wait(30)
        queued = pool.submit(post)  # fills the queue (1,000 points)
        wait_for(lambda: server_pending(server) == 1000)
        r = post()
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        assert r.headers["retry-after"].isdigit()
        fake.release.set()
        assert held.result().status_code == 202 and queued.result().status_code == 202
    assert len(server.admin.get("/v1/telemetry", params={"limit": 10000}).json()["points"]) == 2000  # the refused one stored nothing


def server_pending(server) -> int:  # noqa: ANN001
    return server._server.config.app.state.ctx.telemetry._pending


def test_a_failed_transaction_fails_its_waiters_and_a_data_error_only_its_own_post(monkeypatch):
    def fail(posts) -> None:  # noqa: ANN001
        ids = [p.device_id for p in posts]
        if "broken" in ids:
            raise RuntimeError("database gone")
        if "bad" in ids:
            raise IntegrityError("INSERT", {}, Exception("bad row"))

    fake = _Blocking(fail)
    monkeypatch.setattr(writer_mod, "write_posts", fake)

    async def main() -> None:
        w = TelemetryWriter(None, max_pending_points=10_000)  # type: ignore[arg-type]
        w.start()
        first = asyncio.ensure_future(w.submit("broken", _batch(1)))
        await asyncio.to_thread(fake.entered.wait, 30)
        group = [asyncio.ensure_future(w.submit(name, _batch(1))) for name in ("a", "bad", "b")]
        await asyncio.sleep(0)
        fake.release.set()
        with pytest.raises(RuntimeError, match="database gone"):
            await first
        results = await asyncio.gather(*group, return_exceptions=True)
        assert results[0] == 1 and results[2] == 1 and isinstance(results[1], IntegrityError)
        await asyncio.to_thread(w.stop)
        with pytest.raises(Unavailable):
            await w.submit("late", _batch(1))

    asyncio.run(main())
    assert fake.groups == [["broken"], ["a", "bad", "b"], ["a"], ["bad"], ["b"]]
