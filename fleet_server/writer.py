"""The telemetry group-commit writer: one thread writes every queued telemetry post, many per transaction.

A telemetry post used to be one write transaction in a threadpool thread. On SQLite the writers
then queued on the database lock, each sleeping in SQLite's busy handler (1, 2, 5, 10... ms steps,
not woken when the lock frees) while holding a pooled connection: at ~170 posts/s the tail grew to
seconds with the CPU mostly idle, and once the pool ran dry even the desired-state reads waited.

Now the route validates the body, puts ``(device_id, batch)`` on a bounded queue and awaits a
future; this module's one thread takes everything queued, inserts it in ONE transaction, commits,
then settles the futures. The 202 still comes only after the commit (same durability as before);
a failed transaction fails its waiters with the error it raised (mapped as any other error), except
that a data error (integrity, out of range) is retried post by post so one bad batch cannot fail
the others. A full queue answers 503 with ``Retry-After`` at once; the agent retries 5xx later.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import DataError, IntegrityError

from fleet_server.db import Database, utcnow
from fleet_server.errors import Unavailable
from fleet_server.schemas import TelemetryBatch
from fleet_server.rollups import rollup_rows, upsert_rollups
from fleet_server.tables import TelemetryDrop, TelemetryPoint

__all__ = ["TelemetryWriter"]

log = logging.getLogger("edgekit.fleet")

# A group stops growing past this many points: one transaction stays short (a few ms on SQLite).
_GROUP_POINTS = 5000


@dataclass
class _Post:
    device_id: str
    batch: TelemetryBatch
    received_at: Any
    future: asyncio.Future

    @property
    def size(self) -> int:
        return max(1, len(self.batch.points))


def _rows(post: _Post) -> list[dict[str, Any]]:
    return [{"device_id": post.device_id, "minute": p.minute, "model_sha256": p.model_sha256, "model_version": p.model_version,
             "data": p.model_dump(mode="json", exclude={"minute", "model_sha256", "model_version"}), "received_at": post.received_at}
            for p in post.batch.points]


def write_posts(db: Database, posts: list[_Post]) -> None:
    """Every post's points and dropped counts in one write transaction."""
    rows: list[dict[str, Any]] = []
    drops: list[dict[str, Any]] = []
    for post in posts:
        rows += _rows(post)
        if post.batch.dropped:
            drops.append({"device_id": post.device_id, "dropped": post.batch.dropped, "received_at": post.received_at})
    with db.write() as s:
        if rows:
            s.execute(insert(TelemetryPoint), rows)
            upsert_rollups(s, rollup_rows(rows))  # what the field statistics read (fleet_server.rollups)
        if drops:
            s.execute(insert(TelemetryDrop), drops)


class TelemetryWriter:
    """A bounded queue of telemetry posts and the one thread that commits them in groups."""

    def __init__(self, db: Database, max_pending_points: int) -> None:
        self.db = db
        self.max_pending_points = max_pending_points
        self._queue: collections.deque[_Post] = collections.deque()
        self._pending = 0  # points queued, not yet taken by the thread
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start the thread; call on the event loop that will await the posts."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="edgekit-telemetry-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued, then end the thread (blocking: run it off the event loop)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    async def submit(self, device_id: str, batch: TelemetryBatch) -> int:
        """Queue one post and wait for its commit; returns the points accepted. A full queue raises Unavailable (503)."""
        assert self._loop is not None, "TelemetryWriter.start() was not called"
        post = _Post(device_id, batch, utcnow(), self._loop.create_future())
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down", "Send the batch again in a moment.", retry_after_s=5)
            if self._pending and self._pending + post.size > self.max_pending_points:
                raise Unavailable("too much telemetry is queued for writing", "Send the batch again later; nothing was stored.",
                                  retry_after_s=5)
            self._queue.append(post)
            self._pending += post.size
            self._cond.notify()
        await post.future
        return len(batch.points)

    def _take(self) -> list[_Post] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            group: list[_Post] = []
            points = 0
            while self._queue and (not group or points + self._queue[0].size <= _GROUP_POINTS):
                post = self._queue.popleft()
                group.append(post)
                points += post.size
            self._pending -= points
            return group

    def _run(self) -> None:
        while (group := self._take()) is not None:
            outcomes: list[tuple[_Post, BaseException | None]]
            try:
                write_posts(self.db, group)
                outcomes = [(p, None) for p in group]
            except (IntegrityError, DataError) as e:
                if len(group) == 1:
                    outcomes = [(group[0], e)]
                else:  # a data error is one post's fault: write each alone so the others still land
                    outcomes = [(p, self._write_one(p)) for p in group]
            except BaseException as e:  # noqa: BLE001 - every waiter gets this transaction's error
                outcomes = [(p, e) for p in group]
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(_settle, outcomes)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _write_one(self, post: _Post) -> BaseException | None:
        try:
            write_posts(self.db, [post])
        except BaseException as e:  # noqa: BLE001 - handed to this post's waiter
            return e
        return None


def _settle(outcomes: list[tuple[_Post, BaseException | None]]) -> None:
    for post, error in outcomes:
        if post.future.done():  # the request was cancelled (client gone); the write stands
            continue
        if error is None:
            post.future.set_result(None)
        else:
            post.future.set_exception(error)
