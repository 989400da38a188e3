"""Rotating the server key without re-enrolling devices.

The new key is announced in an ``edgekit.key-rotation/v1`` statement signed by the key it replaces
(:mod:`edgekit.trust`); devices fetch the chain of statements (``GET /v1/device/trust``), check each
with the key they have pinned, and switch. The steps survive a crash at any point:

1. the new private key is written to ``<key>.next`` (0600, fsynced);
2. one transaction stores the statement and re-signs every device's desired assignment with the new key;
3. ``<key>.next`` is renamed over the key file, and the running server signs with the new key.

A start-up after a crash between 2 and 3 finishes the rename (:func:`finish_pending_rotation`);
after a crash before 2 committed, the stale ``.next`` is removed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from edgekit import signing
from edgekit.trust import ROTATION_TYPE, sign_document
from fleet_server.context import AppContext
from fleet_server.db import utcnow
from fleet_server.replicas import record_signing_key
from fleet_server.signer import ServerKey
from fleet_server.storage import fsync_dir
from fleet_server.tables import Device
from fleet_server.trust_tables import ServerKeyRotation

__all__ = ["finish_pending_rotation", "rotate_server_key", "rotation_chain", "rotation_in_progress"]

log = logging.getLogger("edgekit.fleet")
_ROTATE_LOCK = threading.Lock()


def rotation_chain(session: Session) -> list[dict[str, Any]]:
    """Every rotation statement, oldest first, as devices receive them."""
    rows = session.execute(select(ServerKeyRotation).order_by(ServerKeyRotation.sequence)).scalars()
    return [{"payload": r.payload, "signature": r.signature, "key_id": r.old_key_id} for r in rows]


def _next_path(key_path: Path) -> Path:
    return key_path.with_name(key_path.name + ".next")


def _write_private_key(path: Path, key: signing.Ed25519PrivateKey) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())


def _resign_desired(session: Session, key: ServerKey, *, only_key_id: str | None = None) -> int:
    """Re-sign every device's desired assignment (same payload, so agents do not take it up twice).

    ``only_key_id``: only those still signed by that key.
    """
    count = 0
    for device_id, body in session.execute(select(Device.id, Device.desired_body).where(Device.desired_body.is_not(None))).all():
        signed = json.loads(body)
        if only_key_id is not None and signed.get("key_id") != only_key_id:
            continue
        new = json.dumps({"payload": signed["payload"], "signature": key.sign(signed["payload"]), "key_id": key.key_id}, separators=(",", ":"))
        session.execute(update(Device).where(Device.id == device_id).values(desired_body=new).execution_options(synchronize_session=False))
        count += 1
    return count


def rotation_in_progress() -> bool:
    """True while this process rotates its key (the database may already name the new key, ``ctx.key`` not yet)."""
    return _ROTATE_LOCK.locked()


def rotate_server_key(ctx: AppContext) -> dict[str, Any]:
    """Make a new server key, announce it signed by the current one, re-sign desired states, switch."""
    with _ROTATE_LOCK:
        old = ctx.key
        new_private = signing.Ed25519PrivateKey.generate()
        new_public = signing.public_key_b64(new_private)
        new = ServerKey(new_private, new_public, signing.fingerprint(new_public))
        key_path = ctx.settings.key_path
        _write_private_key(_next_path(key_path), new_private)
        with ctx.db.write() as s:
            sequence = int(s.execute(select(func.max(ServerKeyRotation.sequence))).scalar_one() or 0) + 1
            now = utcnow().replace(microsecond=0)
            payload = {"type": ROTATION_TYPE, "sequence": sequence, "old_key_id": old.key_id, "old_public_key": old.public_key,
                       "new_key_id": new.key_id, "new_public_key": new.public_key, "issued_at": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
            doc = sign_document(old.private, payload)
            s.add(ServerKeyRotation(sequence=sequence, old_key_id=old.key_id, new_key_id=new.key_id, new_public_key=new.public_key,
                                    payload=doc["payload"], signature=doc["signature"], created_at=now))
            resigned = _resign_desired(s, new)
            record_signing_key(s, new.key_id)  # every replica sees the change (fleet_server.replicas)
        os.replace(_next_path(key_path), key_path)
        fsync_dir(key_path.parent)
        ctx.key = new
        # an assignment the engine issued with the old key while the rotation committed: sign it again
        with ctx.db.write() as s:
            resigned += _resign_desired(s, new, only_key_id=old.key_id)
        log.warning("server key rotated: %s -> %s (sequence %d, %d desired assignments re-signed)", old.key_id, new.key_id, sequence, resigned)
        return {"sequence": sequence, "old_key_id": old.key_id, "new_key_id": new.key_id, "new_public_key": new.public_key,
                "resigned_assignments": resigned}


def finish_pending_rotation(ctx: AppContext) -> None:
    """At start-up: complete a rotation interrupted between its commit and the key file's rename (or drop an uncommitted one)."""
    pending = _next_path(ctx.settings.key_path)
    if not pending.exists():
        return
    key = ServerKey.load_or_create(pending)
    with ctx.db.read() as s:
        committed = s.execute(select(ServerKeyRotation.sequence).where(ServerKeyRotation.new_key_id == key.key_id)).first() is not None
    if committed:
        os.replace(pending, ctx.settings.key_path)
        fsync_dir(pending.parent)
        ctx.key = key
        log.warning("finished an interrupted server key rotation: now signing with %s", key.key_id)
    else:
        pending.unlink()
        log.warning("removed the new key of a server key rotation that never committed")
