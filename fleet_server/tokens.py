"""API tokens: made here, stored as sha256 only, looked up through a small in-process cache."""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from fleet_server.db import utcnow
from fleet_server.tables import Token

__all__ = ["PREFIXES", "Principal", "Scope", "TokenCache", "create_token", "hash_token", "new_token"]

Scope = Literal["admin", "enroll", "device"]
PREFIXES: dict[str, str] = {"admin": "ekadm_", "enroll": "ekenr_", "device": "ekdev_"}


@dataclass(frozen=True)
class Principal:
    """Who is calling: a scope, the device for a device token, and the token's id and name (the audit log's "who")."""

    scope: str
    device_id: str | None = None
    token_id: int | None = None
    name: str | None = None

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return self.name or (f"device:{self.device_id}" if self.device_id else f"{self.scope}-token:{self.token_id}")


def new_token(scope: str) -> str:
    """32 random bytes, URL-safe base64, prefixed with the scope."""
    return PREFIXES[scope] + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def hash_token(token: str) -> str:
    """What the database keeps of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, scope: str, *, device_id: str | None = None, label: str = "", name: str | None = None) -> str:
    """Make a token, store its hash in the session's transaction, return the token (shown once)."""
    token = new_token(scope)
    session.add(Token(token_hash=hash_token(token), scope=scope, device_id=device_id, label=label, name=name, created_at=utcnow()))
    return token


_LOOKUP = select(Token.id, Token.scope, Token.device_id, Token.name).where(Token.token_hash == bindparam("h"), Token.revoked_at.is_(None))


class TokenCache:
    """Token hash → Principal for ``ttl_s`` seconds (positive answers only, device and enroll tokens), bounded in size.

    The hot path (device polls) would otherwise read the tokens table on every request. Admin
    tokens are never cached: each admin request reads its (indexed) row, so a revoked admin token
    is refused on the next request by every server process.
    """

    def __init__(self, ttl_s: float, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()
        self.enabled = True  # off while a replica's revocation listener is down (fleet_server.revocations)

    def get(self, token_hash: str) -> Principal | None:
        hit = self._entries.get(token_hash) if self.enabled else None
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, token_hash: str, principal: Principal) -> None:
        if self.ttl_s <= 0 or principal.scope == "admin" or not self.enabled:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()  # crude but bounded; refills from the indexed table
            self._entries[token_hash] = (time.monotonic() + self.ttl_s, principal)

    def drop(self, token_hash: str) -> None:
        """Forget a token (revoked in this process: refused here at once)."""
        with self._lock:
            self._entries.pop(token_hash, None)

    def clear(self) -> None:
        """Forget everything (a replica's revocation listener (re)connected: it may have missed some)."""
        with self._lock:
            self._entries.clear()

    def drop_device(self, device_id: str) -> None:
        """Forget every cached token of a device (decommissioned)."""
        with self._lock:
            for h in [h for h, (_, p) in self._entries.items() if p.device_id == device_id]:
                del self._entries[h]

    def lookup(self, connect, token: str) -> Principal | None:  # noqa: ANN001 - a Database.connect / connect_on_loop
        """The principal of ``token``, from the cache or the tokens table (one statement on a bare connection: a device's
        lookup comes back about once per TTL, so in a large fleet it is a good share of all requests)."""
        h = hash_token(token)
        principal = self.get(h)
        if principal is not None:
            return principal
        with connect() as conn:
            row = conn.execute(_LOOKUP, {"h": h}).first()
        if row is None:
            return None
        principal = Principal(row.scope, row.device_id, row.id, row.name)
        self.put(h, principal)
        return principal
