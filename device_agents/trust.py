"""The device's trust store: the server key it follows and the publisher keys whose bundles it runs.

``trust.json`` in the data dir (0600, replaced atomically)::

    {"server_public_key": ..., "key_id": ..., "rotation_sequence": N,
     "publishers": {"version": V, "keys": [...], "labels": [...]}}

Enrollment pins the server key (``identity.json``); the first trust document fetched right after it
pins the allow-list. Later documents are taken only when they verify (:mod:`edgekit.trust`): key
rotations each signed by the key they replace, an allow-list signed by the (possibly rotated) key
with a version not lower than the one held. Publisher keys pinned on the device itself
(``--trusted-key`` / ``EDGEKIT_AGENT_TRUSTED_KEYS``) are the root: when set, the server's list can
only narrow them, so even a compromised server key cannot add a publisher (docs/security.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgekit.errors import VerificationError
from edgekit.trust import follow_rotations, verify_publishers

from device_agents.store import DataDir, atomic_write_json, read_json

__all__ = ["TrustStore"]

log = logging.getLogger("edgekit.agent")


class TrustStore:
    """``trust.json`` of one data dir, on top of the key pinned at enrollment."""

    def __init__(self, data: DataDir) -> None:
        self.path: Path = data.root / "trust.json"
        self._data = data

    def load(self) -> dict:
        """The stored trust (empty before the first trust document)."""
        return read_json(self.path) or {}

    def server_key(self, identity: dict) -> str:
        """The server key to verify assignments with: the latest followed rotation, else the one pinned at enrollment."""
        return self.load().get("server_public_key") or identity["server_public_key"]

    def publisher_keys(self) -> tuple[str, ...] | None:
        """The server's allow-list as last verified (None: never received)."""
        pubs = self.load().get("publishers")
        return None if pubs is None else tuple(pubs.get("keys") or ())

    def effective_publishers(self, pinned: tuple[str, ...]) -> tuple[str, ...] | None:
        """The keys a fleet bundle may be signed by: the server's list, narrowed to ``pinned`` when the device pins any."""
        server = self.publisher_keys()
        if server is None:
            return None
        return tuple(k for k in server if k in pinned) if pinned else server

    def update(self, identity: dict, document: dict) -> list[str]:
        """Take a ``/v1/device/trust`` answer: follow rotations, then the allow-list; returns what changed.

        Raises VerificationError (nothing stored) when a rotation is forged or the allow-list does not
        verify or is older than the one held.
        """
        current = self.load()
        pinned = self.server_key(identity)
        key, sequence = follow_rotations(document.get("rotations") if isinstance(document, dict) else None,
                                         pinned_public_key=pinned, last_sequence=int(current.get("rotation_sequence") or 0))
        held = current.get("publishers") or {}
        allow = verify_publishers(document.get("publishers"), server_public_key=key, min_version=int(held.get("version") or 0))
        changed = []
        if key != pinned:
            changed.append(f"server key rotated to {document.get('server_key', {}).get('key_id') or '?'} (sequence {sequence})")
        if allow.version != held.get("version"):
            changed.append(f"publisher allow-list version {allow.version} ({len(allow.keys)} keys)")
        if changed or not self.path.exists():
            from edgekit import signing

            atomic_write_json(self.path, {"server_public_key": key, "key_id": signing.fingerprint(key), "rotation_sequence": sequence,
                                          "publishers": allow.to_dict()}, mode=0o600)
        for c in changed:
            log.info("trust: %s", c)
        return changed

    def refresh(self, identity: dict, fetch) -> None:  # noqa: ANN001 - fetch: () -> dict (FleetClient.trust)
        """Fetch and take the server's trust document; a forged or replayed one is logged and ignored (the old trust stays)."""
        try:
            self.update(identity, fetch())
        except VerificationError as e:
            log.warning("trust document refused (%s); keeping the trust this device had", e.message)
