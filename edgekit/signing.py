"""Ed25519 signing of bundle manifests.

A bundle is signed with the builder's key; ``signature.json`` holds the signature over the
exact bytes of ``manifest.json`` and the public key. The manifest in turn pins the model
file and golden set by sha256, so one signature covers every byte of the bundle.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgekit.errors import BundleError, InputError

__all__ = [
    "default_key_path",
    "fingerprint",
    "load_or_create_key",
    "public_key_b64",
    "sign",
    "verify",
]


def default_key_path() -> Path:
    """``EDGEKIT_SIGNING_KEY``, else ``~/.config/edgekit/signing_key.pem``."""
    env = os.environ.get("EDGEKIT_SIGNING_KEY")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "edgekit" / "signing_key.pem"


def load_or_create_key(path: Path | None = None) -> Ed25519PrivateKey:
    """Load the signing key, creating it (mode 0600) on first use."""
    path = path or default_key_path()
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise InputError(f"{path}: not a PEM Ed25519 private key ({e})", "Point EDGEKIT_SIGNING_KEY at a valid key.") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise InputError(f"{path}: the signing key must be Ed25519", "Generate one with 'edgekit' (it creates one on first use).")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key, base64."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def fingerprint(public_b64: str) -> str:
    """A short, stable name for a public key (sha256 of the raw bytes, 16 hex)."""
    return hashlib.sha256(base64.b64decode(public_b64)).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    """Signature of ``data``, base64."""
    return base64.b64encode(key.sign(data)).decode()


def verify(public_b64: str, data: bytes, signature_b64: str) -> None:
    """Raise BundleError unless ``signature_b64`` signs ``data`` under ``public_b64``."""
    try:
        pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_b64, validate=True))
        pub.verify(base64.b64decode(signature_b64, validate=True), data)
    except (InvalidSignature, ValueError) as e:
        raise BundleError(
            "the manifest signature does not verify: manifest.json was changed or signed by another key",
            "Rebuild the bundle with 'edgekit convert', or fetch an intact copy.",
        ) from e
