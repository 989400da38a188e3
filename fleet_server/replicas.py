"""What replicas on one database must agree on, checked at start and on every engine tick.

- The schema: a replica serves only a database at exactly its package's newest migration. On
  PostgreSQL migrations are run once by ``edgekit server migrate`` (never by a start, so N replicas
  starting together never race on DDL); the embedded SQLite default still migrates at start.
- The signing key: the first replica records its key id in ``fleet_identity``; a replica with another
  key refuses to start, and a running replica whose key no longer matches (a rotation done through
  another replica) answers 503 on every API route and fails ``/readyz`` until it runs with the new
  key (the key file is not shared through the database: copy it to every replica).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgekit.errors import UsageError
from fleet_server.db import Database, utcnow
from fleet_server.tables import FleetIdentity  # (defined in fleet_server.replica_tables)

if TYPE_CHECKING:
    from fleet_server.context import AppContext

__all__ = ["KEY_ID", "ReplicaGuard", "check_schema", "claim_signing_key", "key_mismatch", "record_signing_key", "serialised_upload"]

KEY_ID = "server_key_id"
_OPEN_PATHS = ("/healthz", "/readyz", "/metrics")


def check_schema(db: Database, head: str) -> None:
    """Refuse a database not at ``head``, saying which side is behind and what to run."""
    current = db.current()
    if current == head:
        return
    where = db.url.render_as_string(hide_password=True)
    if current is None:
        raise UsageError(f"the database {where} has no edgekit schema (or is unreachable); this server needs migration {head}",
                         f"Run 'edgekit server migrate --db {where}' once, then start the replicas.")
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(db._alembic_config())  # noqa: SLF001 - the one alembic config
    known = {rev.revision for rev in script.walk_revisions()}
    if current in known:
        raise UsageError(f"the database {where} is at migration {current}; this server needs {head}",
                         f"Run 'edgekit server migrate --db {where}' once (after a backup), then start the replicas.")
    raise UsageError(f"the database {where} is at migration {current}, newer than this server knows ({head}): "
                     "another replica runs a newer edgekit",
                     "Run the same edgekit version on every replica (upgrade this one).")


def record_signing_key(session: Session, key_id: str) -> None:
    """Set the fleet's signing key id in the caller's transaction (key rotation)."""
    row = session.get(FleetIdentity, KEY_ID)
    if row is None:
        session.add(FleetIdentity(name=KEY_ID, value=key_id, updated_at=utcnow()))
    else:
        row.value, row.updated_at = key_id, utcnow()


def _fleet_key(db: Database) -> str | None:
    with db.read() as s:
        return s.execute(select(FleetIdentity.value).where(FleetIdentity.name == KEY_ID)).scalar_one_or_none()


def claim_signing_key(db: Database, key_id: str) -> None:
    """Record ``key_id`` as the fleet's key when none is recorded; refuse a different one."""
    recorded = _fleet_key(db)
    if recorded is None:
        try:
            with db.write() as s:
                s.add(FleetIdentity(name=KEY_ID, value=key_id, updated_at=utcnow()))
        except IntegrityError:  # another replica recorded its key at the same moment
            pass
        recorded = _fleet_key(db)
    if recorded != key_id:
        raise UsageError(f"this server's signing key {key_id} is not the fleet's key {recorded} (recorded in the database by "
                         "the replica that started first, or by the last key rotation); refusing to serve",
                         "Every replica must sign with the same key: copy server_key.pem from a running replica's data dir "
                         "into this one's, then start it again.")


def key_mismatch(ctx: AppContext) -> str | None:
    """Why this running replica must refuse to serve (its key is no longer the fleet's), or None.

    The database is read before ``ctx.key``, and a rotation in this process is waited out: the
    database names the new key from its commit on, ``ctx.key`` a moment later.
    """
    from fleet_server.services.keys import rotation_in_progress

    recorded = _fleet_key(ctx.db)
    key_id = ctx.key.key_id
    if recorded is None or recorded == key_id or rotation_in_progress():
        return None
    return (f"this replica signs with key {key_id} but the fleet's key is now {recorded} (rotated through another replica): "
            "copy the new server_key.pem into this replica's data dir and restart it")


class ReplicaGuard:
    """ASGI middleware: while the app's context carries a refusal, every API route answers 503 with it."""

    def __init__(self, app) -> None:  # noqa: ANN001 - an ASGI app
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] == "http" and not scope["path"].startswith(_OPEN_PATHS):
            ctx = getattr(scope["app"].state, "ctx", None)
            refusal = getattr(ctx, "refusal", None)
            if refusal:
                body = json.dumps({"error": {"code": "replica_misconfigured", "message": refusal,
                                             "hint": "See docs/server.md (production layout: replicas)."}}).encode()
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                        (b"retry-after", b"30"), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


UPLOAD_LOCK_KEY = 0x6564_6B74_7570_6C64  # "edktupld": serialises artifact writes and their transaction across replicas


@contextmanager
def serialised_upload(ctx: AppContext) -> Iterator[None]:
    """Hold the upload lock of every process sharing the database: the in-process lock, and on PostgreSQL
    a session advisory lock (on a connection held for the whole store, which spans several transactions)."""
    with ctx.upload_lock:
        if ctx.db.dialect != "postgresql":
            yield
            return
        with ctx.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": UPLOAD_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": UPLOAD_LOCK_KEY})
