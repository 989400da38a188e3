"""The publisher allow-list: which keys may sign the bundles this server stores and its devices run.

Every change is a row in ``trust_changes``; the largest id is the allow-list's ``version``, which
only grows, so a device refuses a replayed older list. The list a device receives is signed by the
server key (:func:`signed_allow_list`).
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgekit import signing
from edgekit.trust import PUBLISHERS_TYPE, sign_document
from fleet_server.context import AppContext
from fleet_server.db import utc, utcnow
from fleet_server.errors import Conflict, InvalidRequest, NotFound
from fleet_server.trust_tables import Publisher, TrustChange

__all__ = ["KEY_ID_RE", "add_publisher", "allowed_keys", "allow_list_version", "list_publishers", "remove_publisher", "signed_allow_list"]

KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")


def _public(p: Publisher) -> dict[str, Any]:
    return {"key_id": p.key_id, "public_key": p.public_key, "label": p.label, "added_at": utc(p.added_at)}


def _checked_key(public_key: str) -> str:
    raw = signing.strict_public_key(public_key)
    if raw is None:
        raise InvalidRequest("public_key is not the base64 of a 32-byte Ed25519 public key",
                             "Send the key 'edgekit bundle key' prints (or a bundle's signature.json public_key).")
    return raw


def add_publisher(session: Session, public_key: str, label: str = "") -> dict[str, Any]:
    """Allow ``public_key``; Conflict when it is on the list already."""
    key = _checked_key(public_key)
    key_id = signing.fingerprint(key)
    if session.get(Publisher, key_id) is not None:
        raise Conflict(f"publisher key {key_id} is on the allow-list already", "List it with GET /v1/publishers.")
    now = utcnow()
    row = Publisher(key_id=key_id, public_key=key, label=label, added_at=now)
    session.add(row)
    session.add(TrustChange(kind="add", key_id=key_id, label=label, at=now))
    session.flush()
    return _public(row)


def remove_publisher(session: Session, key_id: str) -> dict[str, Any]:
    """Take a key off the allow-list (bundles it signed are stored still, but no upload or device accepts new ones)."""
    if not KEY_ID_RE.fullmatch(key_id):
        raise InvalidRequest(f"invalid key id {key_id!r}", "Key ids are 16 lowercase hex characters (GET /v1/publishers).")
    row = session.get(Publisher, key_id)
    if row is None:
        raise NotFound(f"no publisher key {key_id} on the allow-list", "List them with GET /v1/publishers.")
    out = _public(row)
    session.delete(row)
    session.add(TrustChange(kind="remove", key_id=key_id, label=row.label, at=utcnow()))
    session.flush()
    return out


def list_publishers(session: Session) -> list[dict[str, Any]]:
    """Every allowed publisher key, oldest first."""
    return [_public(p) for p in session.execute(select(Publisher).order_by(Publisher.added_at, Publisher.key_id)).scalars()]


def allowed_keys(session: Session) -> frozenset[str]:
    """The base64 public keys on the allow-list."""
    return frozenset(session.execute(select(Publisher.public_key)).scalars())


def allow_list_version(session: Session) -> int:
    """The allow-list's version: the id of its last change (0: never changed)."""
    return int(session.execute(select(func.max(TrustChange.id))).scalar_one() or 0)


def signed_allow_list(ctx: AppContext, session: Session) -> dict[str, str]:
    """The allow-list as an ``edgekit.publishers/v1`` document signed by the server key."""
    now = utcnow().replace(microsecond=0)
    payload = {"type": PUBLISHERS_TYPE, "version": allow_list_version(session), "server_key_id": ctx.key.key_id,
               "publishers": [{"key_id": p["key_id"], "public_key": p["public_key"], "label": p["label"]} for p in list_publishers(session)],
               "issued_at": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
    return sign_document(ctx.key.private, payload)
