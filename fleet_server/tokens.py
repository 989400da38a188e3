"""API tokens: made here, stored as sha256 only, looked up through a small in-process cache."""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.db import utcnow
from fleet_server.tables import Token

__all__ = ["PREFIXES", "Principal", "Scope", "TokenCache", "create_token", "hash_token", "new_token"]

Scope = Literal["admin", "enroll", "device"]
PREFIXES: dict[str, str] = {"admin": "ekadm_", "enroll": "ekenr_", "device": "ekdev_"}


@dataclass(frozen=True)
class Principal:
    """Who is calling: a scope, and the device for a device token."""

    scope: str
    device_id: str | None = None


def new_token(scope: str) -> str:
    """32 random bytes, URL-safe base64, prefixed with the scope."""
    return PREFIXES[scope] + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def hash_token(token: str) -> str:
    """What the database keeps of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, scope: str, *, device_id: str | None = None, label: str = "") -> str:
    """Make a token, store its hash in the session's transaction, return the token (shown once)."""
    token = new_token(scope)
    session.add(Token(token_hash=hash_token(token), scope=scope, device_id=device_id, label=label, created_at=utcnow()))
    return token


class TokenCache:
    """Token hash → Principal for ``ttl_s`` seconds (positive answers only), bounded in size.

    The hot path (device polls) would otherwise read the tokens table on every request.
    """

    def __init__(self, ttl_s: float, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def get(self, token_hash: str) -> Principal | None:
        hit = self._entries.get(token_hash)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, token_hash: str, principal: Principal) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()  # crude but bounded; refills from the indexed table
            self._entries[token_hash] = (time.monotonic() + self.ttl_s, principal)

    def lookup(self, session_factory, token: str) -> Principal | None:  # noqa: ANN001 - a Database.read
        """The principal of ``token``, from the cache or the tokens table."""
        h = hash_token(token)
        principal = self.get(h)
        if principal is not None:
            return principal
        with session_factory() as session:
            row = session.execute(select(Token.scope, Token.device_id).where(Token.token_hash == h)).first()
        if row is None:
            return None
        principal = Principal(row.scope, row.device_id)
        self.put(h, principal)
        return principal
