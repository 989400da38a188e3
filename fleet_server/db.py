"""Database engine, sessions and migrations, for SQLite (default, WAL) and PostgreSQL.

SQLite: WAL so readers never wait for the writer, ``synchronous=NORMAL`` (a killed process loses
no committed transaction; a power cut may lose the last few, never corrupts), a busy timeout, and
``BEGIN IMMEDIATE`` for write transactions so two writers queue on the lock instead of failing on a
read-to-write upgrade.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from edgekit.errors import OutputError, RemoteError, UsageError

__all__ = ["Database", "utc", "utcnow"]

_WRITE = "edgekit_write"
_AUTOCOMMIT = "edgekit_autocommit"


def utcnow() -> dt.datetime:
    """Now, timezone-aware UTC, to the microsecond."""
    return dt.datetime.now(dt.timezone.utc)


def utc(value: dt.datetime | None) -> dt.datetime | None:
    """A stored timestamp as aware UTC (SQLite hands back naive values)."""
    if value is None:
        return None
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


class Database:
    """One engine plus read and write session factories."""

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        self._loop_engine: Engine | None = None
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise UsageError(f"not a database URL: {url!r}", "Use sqlite:///path/fleet.db or postgresql+psycopg://user:pw@host/db.") from None
        self.url = parsed
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise UsageError(f"unsupported database '{self.dialect}'", "Use SQLite (default) or postgresql+psycopg://...")
        try:
            if self.dialect == "sqlite":
                if parsed.database and parsed.database != ":memory:":
                    try:
                        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
                    except OSError as e:
                        raise OutputError(f"cannot create the SQLite database's directory {Path(parsed.database).parent}: {e.strerror}",
                                          "Choose a --data-dir or --db path the server can write.") from None
                self.engine = create_engine(parsed, pool_size=pool_size, max_overflow=2 * pool_size, pool_timeout=30,
                                            connect_args={"check_same_thread": False, "timeout": 30})
                _sqlite_events(self.engine)
                # The desired-state route reads on the event loop (one thread): it gets a connection of
                # its own, so it never waits for the pool, which writers may hold while they queue on the lock.
                if parsed.database and parsed.database != ":memory:":
                    self._loop_engine = create_engine(parsed, poolclass=StaticPool, connect_args={"check_same_thread": False, "timeout": 30})
                    _sqlite_events(self._loop_engine)
            else:
                self.engine = create_engine(parsed, pool_size=pool_size, max_overflow=2 * pool_size, pool_pre_ping=True, pool_timeout=30)
        except (NoSuchModuleError, ImportError) as e:
            raise UsageError(f"no driver for {parsed.drivername}: {e}", "Install the server extra: pip install 'edgekit[server]'.") from None
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.engine.execution_options(**{_WRITE: True}), expire_on_commit=False)
        # one-statement reads: on SQLite no explicit BEGIN (the events below); on PostgreSQL the driver's autocommit, so a
        # read is one round trip instead of BEGIN, SELECT, ROLLBACK (the desired-state and token reads are most requests)
        fast = {_AUTOCOMMIT: True} if self.dialect == "sqlite" else {_AUTOCOMMIT: True, "isolation_level": "AUTOCOMMIT"}
        self._fast = self.engine.execution_options(**fast)
        self._loop_fast = (self._loop_engine or self.engine).execution_options(**fast)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading; rolled back at the end."""
        with self._read() as session:
            yield session

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A bare connection for one quick read (no ORM session; SQLite: no explicit BEGIN)."""
        with self._fast.connect() as conn:
            yield conn

    @contextmanager
    def connect_on_loop(self) -> Iterator[Connection]:
        """Like :meth:`connect`, for a read ON THE EVENT LOOP only: on a SQLite file, one dedicated
        connection (never a wait for the pool); it must not be used from any other thread."""
        with self._loop_fast.connect() as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction: committed when the block ends cleanly, rolled back otherwise."""
        with self._write() as session, session.begin():
            yield session

    def ping(self) -> bool:
        """True when the database answers."""
        try:
            with self.engine.connect() as c:
                c.execute(text("SELECT 1"))
            return True
        except OperationalError:
            return False

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
        if self._loop_engine is not None:
            self._loop_engine.dispose()

    # -- migrations ---------------------------------------------------------------------------

    def _alembic_config(self):
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(resources.files("fleet_server") / "migrations"))
        cfg.attributes["engine"] = self.engine
        return cfg

    def migrate(self) -> str:
        """Upgrade the schema to the newest migration; returns the head revision."""
        from alembic import command

        try:
            command.upgrade(self._alembic_config(), "head")
        except OperationalError as e:
            raise RemoteError(f"cannot use the database {self.url.render_as_string(hide_password=True)}: {e.orig}",
                              "Check --db / EDGEKIT_DB, that the database server is running, and its credentials.") from None
        return self.head()

    def head(self) -> str:
        """The newest migration this package ships."""
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(self._alembic_config()).get_current_head() or ""

    def current(self) -> str | None:
        """The revision the database is at (None before the first migration or when unreachable)."""
        from alembic.runtime.migration import MigrationContext

        try:
            with self.engine.connect() as c:
                return MigrationContext.configure(c).get_current_revision()
        except OperationalError:
            return None


def _sqlite_events(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI types
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA cache_size=-16000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:  # noqa: ANN001
        options = conn.get_execution_options()
        if options.get(_AUTOCOMMIT):  # one SELECT is its own consistent snapshot
            return
        conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get(_WRITE) else "BEGIN")
