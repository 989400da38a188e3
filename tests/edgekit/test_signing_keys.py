"""Where the publisher key comes from (encrypted PEM, passphrase from a variable or a file, PEM text in a
variable) and how publisher keys are named on command lines; every bad case is Error/Hint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from edgekit import signing
from edgekit.errors import InputError


@pytest.fixture()
def key_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "keys" / "signing_key.pem"
    monkeypatch.setenv("EDGEKIT_SIGNING_KEY", str(path))
    for name in ("EDGEKIT_SIGNING_KEY_PEM", "EDGEKIT_SIGNING_KEY_PASSPHRASE", "EDGEKIT_SIGNING_KEY_PASSPHRASE_FILE"):
        monkeypatch.delenv(name, raising=False)
    return path


def test_a_key_created_with_a_passphrase_is_encrypted_and_needs_it(key_env: Path, monkeypatch: pytest.MonkeyPatch, run_cli) -> None:
    monkeypatch.setenv("EDGEKIT_SIGNING_KEY_PASSPHRASE", "correct horse")
    key = signing.load_or_create_key()
    assert key_env.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert key_env.stat().st_mode & 0o777 == 0o600
    assert signing.public_key_b64(signing.load_or_create_key()) == signing.public_key_b64(key)
    monkeypatch.delenv("EDGEKIT_SIGNING_KEY_PASSPHRASE")
    code, _, err = run_cli("bundle", "key")
    assert code == 3 and "encrypted and no passphrase" in err and "Hint:" in err
    monkeypatch.setenv("EDGEKIT_SIGNING_KEY_PASSPHRASE", "wrong")
    code, _, err = run_cli("bundle", "key")
    assert code == 3 and "does not decrypt" in err and "Hint:" in err
    pass_file = key_env.parent / "passphrase"
    pass_file.write_text("correct horse\n")
    monkeypatch.delenv("EDGEKIT_SIGNING_KEY_PASSPHRASE")
    monkeypatch.setenv("EDGEKIT_SIGNING_KEY_PASSPHRASE_FILE", str(pass_file))
    code, out, err = run_cli("bundle", "key", "--json")
    assert code == 0 and json.loads(out)["public_key"] == signing.public_key_b64(key), err
    monkeypatch.setenv("EDGEKIT_SIGNING_KEY_PASSPHRASE_FILE", str(key_env.parent / "missing"))
    code, _, err = run_cli("bundle", "key")
    assert code == 3 and "Error:" in err and "Hint:" in err


def test_pem_text_in_a_variable_wins_for_ci(key_env: Path, monkeypatch: pytest.MonkeyPatch, run_cli) -> None:
    ci = signing.Ed25519PrivateKey.generate()
    pem = ci.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    monkeypatch.setenv("EDGEKIT_SIGNING_KEY_PEM", pem)
    code, out, err = run_cli("bundle", "key", "--json")
    assert code == 0 and json.loads(out) == {"public_key": signing.public_key_b64(ci), "key_id": signing.fingerprint(signing.public_key_b64(ci)),
                                             "source": "EDGEKIT_SIGNING_KEY_PEM"}
    assert not key_env.exists()  # no key file was created
    monkeypatch.setenv("EDGEKIT_SIGNING_KEY_PEM", "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    code, _, err = run_cli("bundle", "key")
    assert code == 3 and "Error:" in err and "Hint:" in err


def test_public_keys_are_named_by_base64_or_key_file(tmp_path: Path) -> None:
    key = signing.Ed25519PrivateKey.generate()
    pub = signing.public_key_b64(key)
    private = tmp_path / "k.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    public = tmp_path / "k.pub.pem"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert signing.parse_public_key(pub) == signing.parse_public_key(str(private)) == signing.parse_public_key(str(public)) == pub
    assert signing.strict_public_key(pub) == pub and signing.strict_public_key(str(private)) is None
    for bad in ("", "abc", "A" * 44, str(tmp_path / "missing.pem")):
        with pytest.raises(InputError):
            signing.parse_public_key(bad)


def test_bundle_verify_trusted_key_accepts_a_key_file(digits_bundles, run_cli) -> None:
    b = next(r for r in digits_bundles.results if r.profile == "raspberry-pi-5").bundle_dir
    import os

    code, out, _ = run_cli("bundle", "verify", b, "--trusted-key", os.environ["EDGEKIT_SIGNING_KEY"], "--json")
    assert code == 0 and json.loads(out)["signer_checked"] is True
    code, out, _ = run_cli("bundle", "verify", b)
    assert code == 0 and "signer was not checked" in out  # integrity only: said plainly
    other = signing.public_key_b64(signing.Ed25519PrivateKey.generate())
    code, out, err = run_cli("bundle", "verify", b, "--trusted-key", other)
    assert code != 0 and "trusted signer" in err and "Hint:" in err
