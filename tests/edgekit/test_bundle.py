"""Bundles: manifest contents, signature, any changed byte detected, .ekb round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgekit.bundle import open_bundle, pack, verify_bundle
from edgekit.errors import BundleError


@pytest.fixture()
def bundle_copy(digits_bundles, tmp_path: Path) -> Path:
    src = next(r for r in digits_bundles.results if r.profile == "raspberry-pi-5").bundle_dir
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_manifest_has_the_required_fields(bundle_copy: Path) -> None:
    raw = json.loads((bundle_copy / "manifest.json").read_text())
    for key in ("schema_version", "name", "version", "format", "profile", "file", "sha256", "size_bytes", "inputs", "outputs",
                "labels", "preprocessing", "quantization", "metrics", "provenance"):
        assert key in raw, key
    assert raw["name"] == "digits" and raw["version"] == "1.2.3" and raw["profile"] == "raspberry-pi-5"
    assert raw["inputs"][0]["dtype"] == "int8" and raw["inputs"][0]["quantization"]["scale"] > 0
    assert raw["outputs"][0]["quantization"] is not None
    assert raw["metrics"]["int8_accuracy"]["status"] == "measured"
    assert raw["metrics"]["activation_bytes"]["status"] == "estimated"
    assert raw["provenance"]["tool_versions"]["ai-edge-litert"]


def test_intact_bundle_verifies(bundle_copy: Path, run_cli) -> None:
    assert verify_bundle(bundle_copy).ok
    code, out, _ = run_cli("bundle", "verify", bundle_copy, "--json")
    assert code == 0 and json.loads(out)["ok"] is True


@pytest.mark.parametrize("target", ["model", "golden", "manifest", "signature"])
def test_any_changed_byte_is_detected(bundle_copy: Path, target: str, run_cli) -> None:
    m = open_bundle(bundle_copy).manifest
    path = bundle_copy / {"model": m.file, "golden": "golden.npz", "manifest": "manifest.json", "signature": "signature.json"}[target]
    data = bytearray(path.read_bytes())
    if target == "manifest":  # still valid JSON, one digit changed
        text = data.decode().replace('"version": "1.2.3"', '"version": "1.2.4"')
        data = bytearray(text.encode())
    elif target == "signature":
        sig = json.loads(data)
        raw = bytearray(__import__("base64").b64decode(sig["signature"]))
        raw[0] ^= 1
        sig["signature"] = __import__("base64").b64encode(bytes(raw)).decode()
        data = bytearray(json.dumps(sig).encode())
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert not verify_bundle(bundle_copy).ok
    code, _, err = run_cli("bundle", "verify", bundle_copy)
    assert code == 3 and "verification failed" in err


def test_untrusted_signer_fails_when_keys_are_pinned(bundle_copy: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgekit.signing import public_key_b64

    other = public_key_b64(Ed25519PrivateKey.generate())
    assert not verify_bundle(bundle_copy, (other,)).ok
    own = json.loads((bundle_copy / "signature.json").read_text())["public_key"]
    assert verify_bundle(bundle_copy, (own,)).ok


def test_pack_round_trip(bundle_copy: Path, tmp_path: Path) -> None:
    archive = pack(bundle_copy, tmp_path / "b.ekb")
    b = open_bundle(archive)
    assert b.manifest.sha256 == open_bundle(bundle_copy).manifest.sha256
    assert verify_bundle(archive).ok


def test_golden_set_holds_inputs_and_references(bundle_copy: Path) -> None:
    b = open_bundle(bundle_copy)
    g = b.golden()
    assert g["x"].shape[0] == b.manifest.golden.count == g["y_float"].shape[0] == g["y_host"].shape[0]
    assert np.isfinite(g["y_host"]).all()


def test_not_a_bundle(tmp_path: Path, run_cli) -> None:
    with pytest.raises(BundleError):
        open_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text('{"name": "x"}')
    with pytest.raises(BundleError, match="invalid manifest"):
        open_bundle(tmp_path)
    code, _, err = run_cli("bundle", "inspect", tmp_path / "nope")
    assert code == 3 and "Error:" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["../../outside.npz", "/dev/zero", "sub/golden.npz", "manifest.json"])
def test_golden_file_must_be_a_plain_name_inside_the_bundle(bundle_copy: Path, name: str) -> None:
    raw = json.loads((bundle_copy / "manifest.json").read_text())
    raw["golden"]["file"] = name
    (bundle_copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError):
        open_bundle(bundle_copy)


def test_a_link_to_bytes_outside_the_bundle_never_verifies(bundle_copy: Path, tmp_path: Path) -> None:
    """A golden.npz that is a symlink to an identical file elsewhere: the hash would match, the bundle does not hold it."""
    outside = tmp_path / "outside.npz"
    shutil.move(bundle_copy / "golden.npz", outside)
    (bundle_copy / "golden.npz").symlink_to(outside)
    result = verify_bundle(bundle_copy)
    assert not result.ok
    assert any(name.startswith("golden") and not ok and "link" in detail for name, ok, detail in result.checks)


def test_signature_that_is_a_directory_fails_the_check_not_the_program(bundle_copy: Path) -> None:
    (bundle_copy / "signature.json").unlink()
    (bundle_copy / "signature.json").mkdir()
    result = verify_bundle(bundle_copy)
    assert not result.ok
    assert ("signature", False, "signature.json is not a regular file") in result.checks


def _resign(bundle: Path, raw: dict) -> None:
    """Rewrite manifest.json as a newer converter would and sign it with a fresh key (returned pinned by the caller)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgekit import signing

    key = Ed25519PrivateKey.generate()
    data = (json.dumps(raw, indent=2) + "\n").encode()
    (bundle / "manifest.json").write_bytes(data)
    pub = signing.public_key_b64(key)
    sig = {"algorithm": "ed25519", "public_key": pub, "key_id": signing.fingerprint(pub), "signature": signing.sign(key, data)}
    (bundle / "signature.json").write_text(json.dumps(sig))


def test_report_fields_from_a_newer_converter_are_ignored_and_stay_signed(bundle_copy: Path) -> None:
    raw = json.loads((bundle_copy / "manifest.json").read_text())
    raw["quantization"]["attempts"][0]["energy_mj"] = 1.5
    raw["quantization"]["future_search_note"] = "x"
    raw["metrics"]["int8_accuracy"]["interval"] = [90, 95]
    raw["provenance"]["ci_run"] = "abc"
    _resign(bundle_copy, raw)
    b = open_bundle(bundle_copy)
    assert verify_bundle(bundle_copy).ok
    assert b.manifest.quantization.attempts[0].recipe == raw["quantization"]["attempts"][0]["recipe"]
    raw["quantization"]["attempts"][0]["energy_mj"] = 2.5  # the ignored key is still covered by the signature
    (bundle_copy / "manifest.json").write_text(json.dumps(raw, indent=2) + "\n")
    assert not verify_bundle(bundle_copy).ok


@pytest.mark.parametrize("where", ["top", "input", "golden"])
def test_an_unknown_key_where_the_device_acts_is_refused(bundle_copy: Path, where: str) -> None:
    raw = json.loads((bundle_copy / "manifest.json").read_text())
    {"top": raw, "input": raw["inputs"][0], "golden": raw["golden"]}[where]["new_behaviour"] = True
    _resign(bundle_copy, raw)
    with pytest.raises(BundleError, match="new_behaviour"):
        open_bundle(bundle_copy)
