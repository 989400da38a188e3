"""Which server process runs the rollout engine.

PostgreSQL (any number of replicas): the engine runs in the one replica holding a session-level
advisory lock (``pg_try_advisory_lock``) on a connection kept for that purpose alone. Every replica
tries to take it on each engine tick; the holder checks its connection on each tick. When the holder
dies (even by SIGKILL) its TCP connection closes, PostgreSQL ends that backend and frees the lock,
and the next tick of another replica takes it: failover within about one ``engine_interval_s``.
The lock only decides who does the work: each engine step is still one transaction that locks the
rollout row ``FOR UPDATE`` and is guarded by the wave's state, so even two steppers in the moment a
lock changes hands (a holder whose connection broke mid-step) change nothing twice.

SQLite (the embedded default) is one process: the server takes an exclusive ``flock`` on
``<database>.server-lock``. ``edgekit server start`` refuses to start while another process holds it;
an embedded second opener (a library user, a test) is told so in the log and still works, because
SQLite serialises its writers and the engine's steps are idempotent.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path
from typing import IO

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from edgekit.errors import UsageError

__all__ = ["ENGINE_LOCK_KEY", "EngineLeadership", "PostgresLeadership", "SQLiteLeadership", "leadership_for"]

log = logging.getLogger("edgekit.fleet")

ENGINE_LOCK_KEY = 0x6564_6B74_656E_6731  # "edktengl": the advisory lock key of the rollout engine (a signed bigint)


class EngineLeadership:
    """Base: always the leader (one process owns the database)."""

    kind = "single-process"

    def acquire(self) -> bool:
        """Called on each engine tick: take or keep leadership; True while this process holds it."""
        return True

    def holds(self) -> bool:
        """The answer of the last :meth:`acquire` (no database round trip)."""
        return True

    def close(self) -> None:
        """Give leadership up (shutdown)."""


class PostgresLeadership(EngineLeadership):
    """A PostgreSQL advisory lock on a dedicated connection."""

    kind = "postgresql-advisory-lock"

    def __init__(self, url: URL) -> None:
        # a short connect timeout: an unreachable database must not hold the engine tick for the TCP default
        self._engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
        self._conn: Connection | None = None
        self._leader = False
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = self._engine.connect()
                if self._leader:
                    self._conn.execute(text("SELECT 1"))  # the lock lives as long as this session does
                else:
                    self._leader = bool(self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": ENGINE_LOCK_KEY}).scalar())
                    if self._leader:
                        log.warning("this replica (pid %d) now runs the rollout engine", os.getpid())
            except Exception as e:  # noqa: BLE001 - any failure of the lock's connection means: not the leader
                if self._leader:
                    log.error("lost the rollout engine's lock (%s); another replica takes over", e.__class__.__name__)
                self._leader = False
                self._drop()
            return self._leader

    def holds(self) -> bool:
        return self._leader

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()
                self._conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
            self._conn = None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._leader:
                try:
                    self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ENGINE_LOCK_KEY})
                except Exception:  # noqa: BLE001 - closing the session frees it anyway
                    pass
            self._leader = False
            self._drop()
            self._engine.dispose()


class SQLiteLeadership(EngineLeadership):
    """An exclusive ``flock`` on a file beside the SQLite database: tells a second server process it is not alone."""

    kind = "sqlite-single-process"

    def __init__(self, database: Path, *, exclusive: bool) -> None:
        self.path = database.with_name(database.name + ".server-lock")
        self._file: IO[str] | None = open(self.path, "a+")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            self._file = None
            message = (f"another edgekit server process (pid {holder}) already serves the SQLite database {database}; "
                       "SQLite is the embedded single-process store")
            hint = "Stop the other server, or run replicas on PostgreSQL (--db postgresql+psycopg://...; see docs/server.md)."
            if exclusive:
                raise UsageError(message, hint) from None
            log.warning("%s. %s", message, hint)
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # frees the flock
            self._file = None


def leadership_for(dialect: str, url: URL, *, exclusive_sqlite: bool = False) -> EngineLeadership:
    """The leadership scheme for a database: an advisory lock on PostgreSQL, a file lock on a SQLite file."""
    if dialect == "postgresql":
        return PostgresLeadership(url)
    if url.database and url.database != ":memory:":
        return SQLiteLeadership(Path(url.database), exclusive=exclusive_sqlite)
    return EngineLeadership()
