"""Signed assignments: each way to be wrong is refused with its own protocol reason, in the protocol's order."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit import signing
from edgekit.errors import VerificationError
from device_agents.verify import check_artifact_file, check_bundle, verify_assignment
from scripted_server import sign_payload

KEY = Ed25519PrivateKey.generate()
PUB = signing.public_key_b64(KEY)
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.timezone.utc)


def payload(**over) -> dict:
    p = {"type": "edgekit.assignment/v1", "device_id": "d1", "rollout_id": "r1", "serial": 7, "action": "install", "model": "digits",
         "version": "1.2.3", "artifact": {"sha256": "a" * 64, "size_bytes": 10, "profile": "raspberry-pi-5", "format": "tflite",
                                          "file": "digits.tflite", "manifest_sha256": "b" * 64, "url": "/v1/artifacts/" + "a" * 64},
         "issued_at": "2026-11-23T10:40:00Z", "expires_at": "2026-12-23T10:40:00Z"}
    p.update(over)
    return p


def check(signed: dict, last_serial: int = 6, profile: str = "raspberry-pi-5", formats=("tflite", "onnx")):
    return verify_assignment(signed, public_key=PUB, device_id="d1", last_serial=last_serial, profile=profile, formats=formats, now=NOW)


def test_a_good_assignment_verifies_and_parses() -> None:
    a = check(sign_payload(KEY, payload()))
    assert a.serial == 7 and a.action == "install" and a.artifact.sha256 == "a" * 64


@pytest.mark.parametrize("make, reason", [
    (lambda: sign_payload(Ed25519PrivateKey.generate(), payload()), "bad_signature"),
    (lambda: {**sign_payload(KEY, payload()), "payload": json.dumps(payload(serial=99))}, "bad_signature"),  # changed after signing
    (lambda: {"payload": json.dumps(payload())}, "bad_signature"),
    (lambda: sign_payload(KEY, payload(expires_at="2026-11-23T11:59:59Z")), "expired"),
    (lambda: sign_payload(KEY, payload(serial=6)), "replayed_serial"),
    (lambda: sign_payload(KEY, payload(serial=3)), "replayed_serial"),
    (lambda: sign_payload(KEY, payload(artifact={**payload()["artifact"], "profile": "coral-edgetpu"})), "wrong_profile"),
    (lambda: sign_payload(KEY, payload(artifact={**payload()["artifact"], "format": "coreml"})), "wrong_profile"),
    (lambda: sign_payload(KEY, payload(device_id="someone-else")), "other:wrong_device"),
    (lambda: sign_payload(KEY, payload(type="something/v9")), "other:malformed_assignment"),
])
def test_each_refusal_has_its_reason(make, reason: str) -> None:
    with pytest.raises(VerificationError) as e:
        check(make())
    assert e.value.reason == reason


def test_order_signature_before_expiry_before_serial() -> None:
    stale = payload(serial=1, expires_at="2020-01-01T00:00:00Z", artifact={**payload()["artifact"], "profile": "x"})
    with pytest.raises(VerificationError) as e:
        check(sign_payload(Ed25519PrivateKey.generate(), stale))
    assert e.value.reason == "bad_signature"
    with pytest.raises(VerificationError) as e:
        check(sign_payload(KEY, stale))
    assert e.value.reason == "expired"
    with pytest.raises(VerificationError) as e:
        check(sign_payload(KEY, {**stale, "expires_at": "2027-01-01T00:00:00Z"}))
    assert e.value.reason == "replayed_serial"


def test_revert_to_no_model_is_valid() -> None:
    a = check(sign_payload(KEY, payload(action="revert", artifact=None)))
    assert a.action == "revert" and a.artifact is None


def test_artifact_and_bundle_checks(bundles, tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"hello")
    check_artifact_file(f, hashlib.sha256(b"hello").hexdigest())
    with pytest.raises(VerificationError) as e:
        check_artifact_file(f, hashlib.sha256(b"hellp").hexdigest())
    assert e.value.reason == "sha256_mismatch"
    b = bundles["pi"]
    msha = hashlib.sha256((b / "manifest.json").read_bytes()).hexdigest()
    check_bundle(b, manifest_sha256=msha, profile="raspberry-pi-5", fmt="tflite")
    with pytest.raises(VerificationError) as e:
        check_bundle(b, manifest_sha256="0" * 64, profile="raspberry-pi-5", fmt="tflite")
    assert e.value.reason == "bundle_invalid"
    with pytest.raises(VerificationError) as e:
        check_bundle(b, manifest_sha256=msha, profile="coral-edgetpu", fmt="tflite")
    assert e.value.reason == "wrong_profile"
    with pytest.raises(VerificationError) as e:  # a trusted signer is required and this one is not it
        check_bundle(b, manifest_sha256=msha, profile=None, fmt=None, trusted_keys=(PUB,))
    assert e.value.reason == "other:untrusted_publisher"


@pytest.mark.parametrize("sha", ["../../x", "A" * 64, "a" * 63, "a" * 65, "g" * 64, "a" * 63 + "/", "a" * 64 + "\n", ""])
def test_an_artifact_sha256_that_is_not_64_lowercase_hex_is_refused(sha: str) -> None:
    """The sha256 names paths on the device (models/<sha>, <sha>.part): even a validly signed odd value is refused."""
    with pytest.raises(VerificationError) as e:
        check(sign_payload(KEY, payload(artifact={**payload()["artifact"], "sha256": sha})))
    assert e.value.reason == "other:malformed_assignment"
    with pytest.raises(VerificationError) as e:  # a revert target too: the slot path is built from it
        check(sign_payload(KEY, payload(action="revert", artifact={**payload()["artifact"], "sha256": sha})))
    assert e.value.reason == "other:malformed_assignment"
