"""Verification of what the server sends, in the protocol's order (docs/protocol.md).

1. signature over the exact payload bytes with the server key pinned at enrollment → ``bad_signature``
2. ``expires_at`` in the future                                                        → ``expired``
3. ``serial`` greater than the last accepted one                                       → ``replayed_serial``
4. artifact profile and format are this device's                                        → ``wrong_profile``
5. (download) sha256 of the whole artifact equals ``artifact.sha256``                   → ``sha256_mismatch``
6. the bundle's ``manifest.json`` sha256 equals ``artifact.manifest_sha256``            → ``bundle_invalid``
7. every file hash of the bundle (``edgekit.bundle.verify_bundle``)                     → ``bundle_invalid``
8. the bundle's publisher key is one this device trusts (docs/security.md)              → ``other:untrusted_publisher``

Each failure raises :class:`edgekit.errors.VerificationError` with that ``reason``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from pydantic import ValidationError

from edgekit import signing
from edgekit.bundle import MANIFEST_FILE, open_bundle, sha256_file, verify_bundle
from edgekit.errors import BundleError, VerificationError
from edgekit.protocol import ArtifactRef, Assignment

__all__ = ["Artifact", "Assignment", "check_artifact_file", "check_bundle", "parse_time", "verify_assignment"]

# The wire shapes live once, in edgekit.protocol (shared with the server and the admin client).
Artifact = ArtifactRef


def parse_time(value: str) -> dt.datetime:
    """An ISO 8601 time (``Z`` or an offset) as an aware datetime."""
    t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def verify_assignment(signed: dict, *, public_key: str, device_id: str, last_serial: int, profile: str | None,
                      formats: tuple[str, ...] | None, now: dt.datetime | None = None) -> Assignment:
    """Steps 1-4: the signed assignment is authentic, current, new and meant for this device."""
    payload = signed.get("payload")
    if not isinstance(payload, str) or not isinstance(signed.get("signature"), str):
        raise VerificationError("the assignment has no payload string or signature", reason="bad_signature")
    try:
        signing.verify(public_key, payload.encode("utf-8"), signed["signature"])
    except BundleError:
        raise VerificationError("the assignment's signature does not verify with the server key pinned at enrollment",
                                "Someone other than the enrolled server signed it, or it was changed in transit.",
                                reason="bad_signature") from None
    try:
        a = Assignment.model_validate_json(payload)
        expires = parse_time(a.expires_at)
    except (ValidationError, ValueError) as e:
        raise VerificationError(f"the signed assignment is malformed ({str(e)[:200]})", reason="other:malformed_assignment") from None
    if a.device_id != device_id:
        raise VerificationError(f"the assignment is for device {a.device_id}, not this one ({device_id})", reason="other:wrong_device")
    if expires <= (now or dt.datetime.now(dt.timezone.utc)):
        raise VerificationError(f"the assignment expired at {a.expires_at}", reason="expired")
    if a.serial <= last_serial:
        raise VerificationError(f"serial {a.serial} is not greater than the last accepted serial {last_serial} (replay)",
                                reason="replayed_serial")
    art = a.artifact
    if art is not None and profile is not None and art.profile != profile:
        raise VerificationError(f"the artifact is for profile {art.profile}, this device is {profile}", reason="wrong_profile")
    if art is not None and formats is not None and art.format not in formats:
        raise VerificationError(f"the artifact's format {art.format} does not run on this device ({', '.join(formats)})",
                                reason="wrong_profile")
    if a.action == "install" and art is None:
        raise VerificationError("an install assignment without an artifact", reason="other:malformed_assignment")
    return a


def check_artifact_file(path: Path, expected_sha256: str) -> None:
    """Step 5: the whole downloaded file hashes to what the assignment says."""
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise VerificationError(f"the artifact's sha256 is {actual[:16]}…, the assignment says {expected_sha256[:16]}…",
                                "The download was corrupted or the server's copy changed; it is not used.", reason="sha256_mismatch")


def check_bundle(bundle_dir: Path, *, manifest_sha256: str | None, profile: str | None, fmt: str | None,
                 trusted_keys: tuple[str, ...] | None = None) -> None:
    """Steps 6-8: the manifest is the one the server validated, every file matches it, and its publisher is trusted.

    ``trusted_keys``: the publisher keys (base64) the bundle's signer must be one of; an empty tuple
    trusts nobody; None skips step 8 (only for an explicit ``--insecure-any-publisher`` install).
    """
    manifest_path = bundle_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise VerificationError(f"{bundle_dir.name}: no {MANIFEST_FILE}; not a bundle", reason="bundle_invalid")
    if manifest_sha256 is not None:
        actual = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
        if actual != manifest_sha256:
            raise VerificationError(f"manifest.json hashes to {actual[:16]}…, the assignment says {manifest_sha256[:16]}…",
                                    reason="bundle_invalid")
    try:
        result = verify_bundle(bundle_dir)
        manifest = open_bundle(bundle_dir).manifest
    except BundleError as e:
        raise VerificationError(e.message, reason="bundle_invalid") from None
    if not result.ok:
        failed = "; ".join(f"{c}: {d}" for c, ok, d in result.checks if not ok)
        raise VerificationError(f"bundle checks failed ({failed})", reason="bundle_invalid")
    if trusted_keys is not None and result.public_key not in trusted_keys:
        raise VerificationError(f"the bundle is signed by publisher key {result.key_id}, which this device does not trust",
                                "Only bundles signed by a publisher on the server's allow-list (or a --trusted-key) are run.",
                                reason="other:untrusted_publisher")
    if profile is not None and manifest.profile != profile:
        raise VerificationError(f"the bundle is built for {manifest.profile}, this device is {profile}", reason="wrong_profile")
    if fmt is not None and manifest.format != fmt:
        raise VerificationError(f"the bundle's format is {manifest.format}, expected {fmt}", reason="wrong_profile")
    from edgekit.device_support import format_unavailable_reason

    missing = format_unavailable_reason(manifest.format)
    if missing is not None:  # refused here, before profiling or activation, with the device's reason
        raise VerificationError(f"this device cannot load {manifest.format} bundles: {missing}",
                                "Roll out a format this device's runtime loads (see 'edgekit profile detect'), or install its runtime.",
                                reason="other:runtime_unavailable")
