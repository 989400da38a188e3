"""The server's Ed25519 key: created on first start (0600) in the data dir; signs every assignment."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit import signing

__all__ = ["ServerKey", "canonical_json"]


def canonical_json(payload: dict[str, Any]) -> str:
    """Sorted keys, no whitespace: the exact string that is signed and sent."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class ServerKey:
    """The signing key and its public half as served at /v1/server/public-key."""

    private: signing.Ed25519PrivateKey
    public_key: str
    key_id: str

    @classmethod
    def load_or_create(cls, path: Path) -> ServerKey:
        """Load the key at ``path``, creating it (mode 0600) on first start."""
        key = signing.load_or_create_key(path, passphrase=None)  # never the publisher key's passphrase variables
        pub = signing.public_key_b64(key)
        return cls(key, pub, signing.fingerprint(pub))

    def sign(self, payload: str) -> str:
        """Base64 Ed25519 signature over the UTF-8 bytes of ``payload``."""
        return signing.sign(self.private, payload.encode())
