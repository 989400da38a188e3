"""Ed25519 signing of bundle manifests, and where the signing key comes from.

A bundle is signed with the publisher's key; ``signature.json`` holds the signature over the
exact bytes of ``manifest.json`` and the public key. The manifest in turn pins the model
file and golden set by sha256, so one signature covers every byte of the bundle.

The publisher key is found, in order: ``EDGEKIT_SIGNING_KEY_PEM`` (the PEM text itself, e.g. a CI
secret), the file ``EDGEKIT_SIGNING_KEY`` names, else ``~/.config/edgekit/signing_key.pem``
(created 0600 on first use). A PEM may be passphrase-encrypted (PKCS#8, ``BestAvailableEncryption``);
the passphrase comes from ``EDGEKIT_SIGNING_KEY_PASSPHRASE`` or the file
``EDGEKIT_SIGNING_KEY_PASSPHRASE_FILE`` names, and a key created while one is set is written
encrypted with it. docs/security.md says where keys should live.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgekit.errors import BundleError, InputError

__all__ = [
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "default_key_path",
    "fingerprint",
    "load_or_create_key",
    "parse_public_key",
    "passphrase_from_env",
    "public_key_b64",
    "sign",
    "strict_public_key",
    "verify",
]

_FROM_ENV = object()  # load_or_create_key's default: take the passphrase from the environment


def default_key_path() -> Path:
    """``EDGEKIT_SIGNING_KEY``, else ``~/.config/edgekit/signing_key.pem``."""
    env = os.environ.get("EDGEKIT_SIGNING_KEY")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "edgekit" / "signing_key.pem"


def passphrase_from_env() -> bytes | None:
    """The signing key's passphrase: ``EDGEKIT_SIGNING_KEY_PASSPHRASE``, else the file ``..._PASSPHRASE_FILE`` names."""
    value = os.environ.get("EDGEKIT_SIGNING_KEY_PASSPHRASE")
    if value:
        return value.encode()
    path = os.environ.get("EDGEKIT_SIGNING_KEY_PASSPHRASE_FILE")
    if not path:
        return None
    try:
        text = Path(path).read_bytes().rstrip(b"\r\n")
    except OSError as e:
        raise InputError(f"EDGEKIT_SIGNING_KEY_PASSPHRASE_FILE={path}: cannot read it ({e.strerror})",
                         "Point it at a readable file holding the passphrase.") from None
    if not text:
        raise InputError(f"EDGEKIT_SIGNING_KEY_PASSPHRASE_FILE={path} is empty", "Write the passphrase into it, or unset the variable.")
    return text


def _load_pem(data: bytes, where: str, passphrase: bytes | None) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as e:  # encrypted without a passphrase, or a passphrase for a plain key
        if passphrase is None:
            raise InputError(f"{where}: the signing key is encrypted and no passphrase was given",
                             "Set EDGEKIT_SIGNING_KEY_PASSPHRASE or EDGEKIT_SIGNING_KEY_PASSPHRASE_FILE.") from None
        raise InputError(f"{where}: {e}", "Unset EDGEKIT_SIGNING_KEY_PASSPHRASE(_FILE) for an unencrypted key.") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        bad_pass = passphrase is not None and ("password" in str(e).lower() or "decrypt" in str(e).lower())
        if bad_pass:
            raise InputError(f"{where}: the passphrase does not decrypt the signing key",
                             "Check EDGEKIT_SIGNING_KEY_PASSPHRASE / EDGEKIT_SIGNING_KEY_PASSPHRASE_FILE.") from None
        raise InputError(f"{where}: not a PEM Ed25519 private key ({e})", "Point EDGEKIT_SIGNING_KEY at a valid key.") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"{where}: the signing key must be Ed25519", "Generate one with 'edgekit' (it creates one on first use).")
    return key


def load_or_create_key(path: Path | None = None, *, passphrase: bytes | None | object = _FROM_ENV) -> Ed25519PrivateKey:
    """Load the signing key, creating it (mode 0600, encrypted when a passphrase is set) on first use.

    With no ``path``, ``EDGEKIT_SIGNING_KEY_PEM`` (the PEM text) wins over the key file.
    ``passphrase``: by default from the environment (:func:`passphrase_from_env`); None: none.
    """
    secret = passphrase_from_env() if passphrase is _FROM_ENV else passphrase
    assert secret is None or isinstance(secret, bytes)
    if path is None and (pem := os.environ.get("EDGEKIT_SIGNING_KEY_PEM")):
        return _load_pem(pem.encode(), "EDGEKIT_SIGNING_KEY_PEM", secret)
    path = path or default_key_path()
    if path.exists():
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputError(f"{path}: cannot read the signing key ({e.strerror})", "Point EDGEKIT_SIGNING_KEY at a readable key.") from None
        return _load_pem(data, str(path), secret)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    encryption = serialization.BestAvailableEncryption(secret) if secret else serialization.NoEncryption()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key, base64."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def strict_public_key(value: str) -> str | None:
    """``value`` when it is exactly the base64 of a 32-byte Ed25519 public key (no files are read), else None."""
    try:
        raw = base64.b64decode(value, validate=True)
        if len(raw) != 32:
            return None
        Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError, TypeError):
        return None
    return base64.b64encode(raw).decode() if base64.b64encode(raw).decode() == value else None


def parse_public_key(value: str) -> str:
    """A publisher key given on a command line or in a variable, as raw base64.

    ``value`` is the base64 of the 32 raw bytes (as ``signature.json`` and ``edgekit bundle key``
    print it), or the path of a PEM file holding an Ed25519 public key or private key.
    """
    text = value.strip()
    if (key := strict_public_key(text)) is not None:
        return key
    path = Path(text).expanduser()
    hint = "Give the base64 public key ('edgekit bundle key' prints it) or the path of a PEM public or private key."
    if not path.is_file():
        raise InputError(f"{value[:80]!r} is neither a base64 Ed25519 public key nor a key file", hint)
    data = path.read_bytes()[: 1 << 16]
    try:
        pub = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        pub = _load_pem(data, str(path), passphrase_from_env()).public_key()
    if not isinstance(pub, Ed25519PublicKey):
        raise InputError(f"{path}: not an Ed25519 key", hint)
    return public_key_b64(pub)


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
    except (InvalidSignature, ValueError, TypeError) as e:
        raise BundleError(
            "the manifest signature does not verify: manifest.json was changed or signed by another key",
            "Rebuild the bundle with 'edgekit convert', or fetch an intact copy.",
        ) from e
