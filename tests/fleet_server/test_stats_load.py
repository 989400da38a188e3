"""What keeps operators' stats queries from starving device traffic (docs/benchmarks.md, issue 14 item 1): stats routes run
at most ``STATS_THREADS`` at a time under a limiter of their own, never on the threadpool tokens device requests use; the
one-statement reads (desired state, token lookups) are one round trip on PostgreSQL (autocommit) and use no session."""

from __future__ import annotations

import threading
import types

import anyio
import anyio.to_thread
from sqlalchemy import text

def test_stats_calls_are_bounded_and_leave_the_default_threadpool_alone() -> None:
    from fleet_server.routers.stats import STATS_THREADS, _bounded

    request = types.SimpleNamespace(app=types.SimpleNamespace(state=types.SimpleNamespace()))
    release = threading.Event()
    lock = threading.Lock()
    inside = {"now": 0, "most": 0}

    def slow_query(n: int) -> int:
        with lock:
            inside["now"] += 1
            inside["most"] = max(inside["most"], inside["now"])
        release.wait(30)
        with lock:
            inside["now"] -= 1
        return n * 2

    async def main() -> list[int]:
        results: list[int] = []

        async def one(n: int) -> None:
            results.append(await _bounded(request, slow_query, n))

        async with anyio.create_task_group() as tg:
            for n in range(3 * STATS_THREADS):
                tg.start_soon(one, n)
            with anyio.fail_after(30):
                while getattr(request.app.state, "stats_limiter", None) is None or \
                        request.app.state.stats_limiter.borrowed_tokens < STATS_THREADS:
                    await anyio.sleep(0.01)
            # the stats limiter is full and the rest queue on it; the default limiter (device requests) is untouched
            assert request.app.state.stats_limiter.borrowed_tokens == STATS_THREADS
            assert anyio.to_thread.current_default_thread_limiter().borrowed_tokens == 0
            assert await anyio.to_thread.run_sync(lambda: "device request served") == "device request served"
            release.set()
        return sorted(results)

    assert anyio.run(main) == [2 * n for n in range(3 * STATS_THREADS)]
    assert inside["most"] == STATS_THREADS


def test_one_statement_reads_are_autocommit_on_postgresql_and_token_lookups_use_them(fleet_db) -> None:
    from fleet_server.db import Database
    from fleet_server.tokens import TokenCache, create_token

    db = Database(fleet_db)
    try:
        db.migrate()
        with db.write() as s:
            token = create_token(s, "enroll", name="line-3")
        with db.connect() as conn:
            conn.exec_driver_sql("SELECT 1").all()
            if db.dialect == "postgresql":  # no BEGIN/ROLLBACK around the statement
                assert conn.connection.dbapi_connection.autocommit is True
        with db.read() as s:  # sessions still run in a transaction
            if db.dialect == "postgresql":
                s.execute(text("SELECT 1"))
                assert s.connection().connection.dbapi_connection.autocommit is False
        for connect in (db.connect, db.connect_on_loop):
            principal = TokenCache(ttl_s=60).lookup(connect, token)
            assert principal is not None and principal.scope == "enroll" and principal.name == "line-3"
        assert TokenCache(ttl_s=60).lookup(db.connect, token + "x") is None
    finally:
        db.dispose()
