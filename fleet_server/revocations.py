"""Token revocations seen by every replica at once: PostgreSQL ``LISTEN``/``NOTIFY``.

A revocation sends ``NOTIFY edgekit_token_revoked`` in its own transaction (PostgreSQL delivers it
only when that transaction commits, to every listening session, the sender's included). Each replica
keeps one listening connection and drops the named token (or every token of a named device) from
its in-process cache. While that connection is down the cache is switched off (every request reads
the tokens table), and it is emptied when listening starts again, since notifications sent in between
are lost: a replica never serves a revoked token from its cache for longer than a notification takes
to arrive. SQLite is one process, whose revocations drop the cache entry directly.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from fleet_server.tokens import TokenCache

__all__ = ["CHANNEL", "RevocationListener", "announce_revocation"]

log = logging.getLogger("edgekit.fleet")
CHANNEL = "edgekit_token_revoked"


def announce_revocation(session: Session, *, token_hash: str | None = None, device_id: str | None = None) -> None:
    """Tell every replica (at commit) to forget a token, or every token of a device; nothing to do on SQLite."""
    if session.get_bind().dialect.name != "postgresql":
        return
    payload = f"token:{token_hash}" if token_hash else f"device:{device_id}"
    session.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": payload})


class RevocationListener:
    """A daemon thread holding ``LISTEN edgekit_token_revoked`` and applying each notification to a cache."""

    def __init__(self, url: URL, cache: TokenCache) -> None:
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.cache = cache
        self._stop = threading.Event()
        self.listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="token-revocations", daemon=True)

    def start(self) -> RevocationListener:
        self.cache.enabled = False  # until LISTEN is in place
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _apply(self, payload: str) -> None:
        kind, _, value = payload.partition(":")
        if kind == "token":
            self.cache.drop(value)
        elif kind == "device":
            self.cache.drop_device(value)

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.cache.clear()  # what was revoked while nobody listened is gone from the cache
                    self.cache.enabled = True
                    self.listening.set()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self._apply(note.payload)
            except Exception as e:  # noqa: BLE001 - the database went away: no caching until listening again
                if self.listening.is_set():
                    log.error("token revocation listener lost its connection (%s); token cache off until it is back", e.__class__.__name__)
            self.cache.enabled = False
            self.listening.clear()
            self._stop.wait(1.0)
