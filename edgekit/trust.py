"""The signed trust documents a fleet server gives its devices, and how a device checks them.

Two signatures guard every model a device runs (docs/security.md): the **publisher** key that
signed the bundle at conversion, and the **server** key that signs each assignment. The device
learns which publisher keys count from the server's *publisher allow-list*, signed by the server
key, and follows the server key itself through *key rotations*, each signed by the key it
replaces. Both are ``{"payload": "<canonical JSON>", "signature": "<base64>", "key_id": "..."}``.

- ``edgekit.publishers/v1``: ``{type, version, server_key_id, publishers: [{key_id, public_key,
  label}], issued_at}``; ``version`` only grows (a replayed older list is refused).
- ``edgekit.key-rotation/v1``: ``{type, sequence, old_key_id, old_public_key, new_key_id,
  new_public_key, issued_at}``, signed by the *old* key; ``sequence`` only grows.

Runs on the device (Python 3.10 and Debian 12's 3.11.2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edgekit import signing
from edgekit.errors import BundleError, VerificationError

__all__ = [
    "PUBLISHERS_TYPE",
    "ROTATION_TYPE",
    "PublisherAllowList",
    "canonical_json",
    "follow_rotations",
    "sign_document",
    "verify_publishers",
]

PUBLISHERS_TYPE = "edgekit.publishers/v1"
ROTATION_TYPE = "edgekit.key-rotation/v1"


def canonical_json(payload: dict[str, Any]) -> str:
    """Sorted keys, no whitespace: the exact string that is signed and sent."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sign_document(key: signing.Ed25519PrivateKey, payload: dict[str, Any]) -> dict[str, str]:
    """``{payload, signature, key_id}`` for ``payload`` signed with ``key``."""
    text = canonical_json(payload)
    pub = signing.public_key_b64(key)
    return {"payload": text, "signature": signing.sign(key, text.encode()), "key_id": signing.fingerprint(pub)}


def _verified_payload(signed: object, public_key: str, what: str) -> dict[str, Any]:
    if not isinstance(signed, dict) or not isinstance(signed.get("payload"), str) or not isinstance(signed.get("signature"), str):
        raise VerificationError(f"the {what} has no payload string or signature", reason="bad_signature")
    try:
        signing.verify(public_key, signed["payload"].encode("utf-8"), signed["signature"])
    except BundleError:
        raise VerificationError(f"the {what}'s signature does not verify with the pinned server key",
                                "Someone other than the enrolled server signed it, or it was changed in transit.",
                                reason="bad_signature") from None
    try:
        payload = json.loads(signed["payload"])
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise VerificationError(f"the signed {what} is not a JSON object", reason="other:malformed_trust")
    return payload


@dataclass(frozen=True)
class PublisherAllowList:
    """A verified publisher allow-list: the base64 public keys whose bundles the device may run."""

    version: int
    keys: tuple[str, ...]
    labels: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (kept in the device's trust store)."""
        return {"version": self.version, "keys": list(self.keys), "labels": list(self.labels)}


def verify_publishers(signed: object, *, server_public_key: str, min_version: int = 0) -> PublisherAllowList:
    """Check an allow-list's signature (pinned server key), type, and that its version is not older than ``min_version``."""
    p = _verified_payload(signed, server_public_key, "publisher allow-list")
    version, entries = p.get("version"), p.get("publishers")
    if p.get("type") != PUBLISHERS_TYPE or not isinstance(version, int) or isinstance(version, bool) or not isinstance(entries, list):
        raise VerificationError("the signed publisher allow-list is malformed", reason="other:malformed_trust")
    if version < min_version:
        raise VerificationError(f"publisher allow-list version {version} is older than the one this device has ({min_version}): a replay",
                                reason="replayed_serial")
    keys, labels = [], []
    for e in entries:
        key = e.get("public_key") if isinstance(e, dict) else None
        if not isinstance(key, str):
            raise VerificationError("the signed publisher allow-list has an entry without a public key", reason="other:malformed_trust")
        keys.append(key)
        labels.append(str(e.get("label") or ""))
    return PublisherAllowList(version, tuple(keys), tuple(labels))


def follow_rotations(chain: object, *, pinned_public_key: str, last_sequence: int = 0) -> tuple[str, int]:
    """Walk the server's key rotations from the pinned key; returns (the key to pin now, its rotation sequence).

    A statement counts only when it rotates away from the key pinned at that point, has a sequence
    above the last one followed, and is signed by that key. Statements from other keys (older
    rotations, or anything an attacker made with a key this device never pinned) are skipped; a
    statement that claims to rotate away from the pinned key but is not signed by it is a forgery
    and raises ``VerificationError`` (``bad_signature``), leaving the pinned key as it was.
    """
    if not isinstance(chain, list):
        raise VerificationError("the server's key rotations are not a list", reason="other:malformed_trust")
    current, seq = pinned_public_key, last_sequence
    for signed in chain:
        claimed = _claimed(signed)
        if claimed.get("old_public_key") != current:
            continue
        p = _verified_payload(signed, current, "key rotation")
        sequence, new_key = p.get("sequence"), p.get("new_public_key")
        if p.get("type") != ROTATION_TYPE or not isinstance(sequence, int) or not isinstance(new_key, str):
            raise VerificationError("a signed key rotation is malformed", reason="other:malformed_trust")
        if sequence <= seq:
            continue  # already followed (or older than what this device knows)
        if not _is_public_key(new_key):
            raise VerificationError("a signed key rotation names a malformed new key", reason="other:malformed_trust")
        current, seq = new_key, sequence
    return current, seq


def _is_public_key(value: str) -> bool:
    """True for the base64 of 32 raw bytes that form an Ed25519 public key."""
    return signing.strict_public_key(value) is not None


def _claimed(signed: object) -> dict[str, Any]:
    """A statement's payload before its signature is checked (only to see which key it claims to rotate)."""
    try:
        p = json.loads(signed["payload"]) if isinstance(signed, dict) else None
    except (TypeError, ValueError):
        return {}
    return p if isinstance(p, dict) else {}
