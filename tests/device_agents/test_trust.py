"""Publisher trust and server key rotation on the device: offline installs need a trusted publisher key,
fleet installs need the server's signed allow-list, and the agent follows a rotated server key but
no forged rotation and no replayed old key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent_support import resign, wait_for
from device_agents.store import DataDir
from device_agents.trust import TrustStore
from edgekit import signing
from edgekit.errors import VerificationError
from edgekit.runtime import read_active_pointer
from edgekit.trust import PUBLISHERS_TYPE, ROTATION_TYPE, sign_document
from fleet_support import upload
from scripted_server import ScriptedServer

pytestmark = pytest.mark.timeout(240)
FAST = ("--profile-runs", "10", "--profile-budget-s", "0.3", "--warmup", "1")


def _flip_model_byte(d: Path) -> None:
    m = json.loads((d / "manifest.json").read_text())
    model = d / m["file"]
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    m["sha256"] = __import__("hashlib").sha256(bytes(data)).hexdigest()
    (d / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")


@pytest.fixture(scope="module")
def attacker_bundle(bundles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The red-team bundle: one model byte flipped, the manifest hash updated, re-signed with a fresh key."""
    work = tmp_path_factory.mktemp("attacker")
    d = resign(bundles["pi"], work / "digits-pi-tampered", Ed25519PrivateKey.generate(), version="6.6.6")
    _flip_model_byte(d)
    data = (d / "manifest.json").read_bytes()
    key = Ed25519PrivateKey.generate()
    pub = signing.public_key_b64(key)
    (d / "signature.json").write_text(json.dumps({"algorithm": "ed25519", "public_key": pub, "key_id": signing.fingerprint(pub),
                                                  "signature": signing.sign(key, data)}))
    return d


def _state(data: Path) -> dict:
    return json.loads((data / "state.json").read_text())


def test_offline_install_without_a_trusted_key_is_refused_before_anything(bundles, run_cli, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEKIT_AGENT_TRUSTED_KEYS", raising=False)
    data = tmp_path / "dev"
    code, out, err = run_cli("agent", "install", bundles["pi"], "--data-dir", data, *FAST)
    assert code == 2 and "Error: no trusted publisher key" in err and "Hint:" in err and "--trusted-key" in err, err
    assert not data.exists()  # a refused run leaves nothing behind


def test_tampered_resigned_bundle_is_not_activated_offline(bundles, attacker_bundle: Path, run_cli, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEKIT_AGENT_TRUSTED_KEYS", raising=False)
    data = tmp_path / "dev"
    session_key_file = os.environ["EDGEKIT_SIGNING_KEY"]  # a PEM key file is accepted as --trusted-key, as is base64
    code, out, err = run_cli("agent", "install", bundles["pi"], "--data-dir", data, "--trusted-key", session_key_file, *FAST, "--json")
    assert code == 0, err
    good = json.loads(out)["sha256"]
    for source in (attacker_bundle, tmp_path / "tampered.ekb"):
        if source.suffix == ".ekb":
            from fleet_support import pack_raw

            pack_raw(attacker_bundle, source)
        code, out, err = run_cli("agent", "install", source, "--data-dir", data, "--trusted-key", session_key_file, *FAST, "--json")
        result = json.loads(out)
        assert code == 9 and not result["ok"] and result["failure"]["reason"] == "other:untrusted_publisher", out
        assert "Error:" in err and "Hint:" in err
        assert _state(data)["state"] == "idle" and read_active_pointer(data).sha256 == good
        assert not [p for p in (data / "models").iterdir() if p.name.startswith(".")]  # no temporary slot left


def test_env_trusted_keys_and_the_loud_opt_out(bundles, run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = resign(bundles["pi"], tmp_path / "digits-pi-other", Ed25519PrivateKey.generate(), version="2.0.0")
    pub = json.loads((other / "signature.json").read_text())["public_key"]
    monkeypatch.setenv("EDGEKIT_AGENT_TRUSTED_KEYS", f"{signing.public_key_b64(signing.load_or_create_key())},{pub}")
    code, out, err = run_cli("agent", "install", other, "--data-dir", tmp_path / "a", *FAST, "--json")
    assert code == 0 and json.loads(out)["ok"], err
    monkeypatch.delenv("EDGEKIT_AGENT_TRUSTED_KEYS")
    code, out, err = run_cli("agent", "install", other, "--data-dir", tmp_path / "b", "--insecure-any-publisher", *FAST, "--json")
    assert code == 0 and json.loads(out)["ok"], err
    code, _, err = run_cli("agent", "install", other, "--data-dir", tmp_path / "c", "--trusted-key", "not-a-key", *FAST)
    assert code != 0 and "Error:" in err and "Hint:" in err and "Traceback" not in err


@pytest.fixture()
def server():
    s = ScriptedServer().start()
    yield s
    s.stop()


def _converged(server: ScriptedServer, data: Path, serial: int, phase: str = "activated"):
    def check():
        return phase in [p for p, _ in server.phases(serial)] and (data / "state.json").exists() and _state(data)["state"] == "idle"
    return check


def test_fleet_bundle_from_a_publisher_off_the_allow_list_is_refused(bundles, attacker_bundle: Path, server: ScriptedServer,
                                                                     spawn_agent, tmp_path: Path) -> None:
    data = tmp_path / "dev"
    a = server.add_bundle(bundles["pi"], tmp_path / "ekb")
    server.assign(server.payload(a))
    spawn_agent(server.url, data, extra_env={"EDGEKIT_AGENT_TRUSTED_KEYS": ""})
    wait_for(_converged(server, data, 1), 60, "A active")
    assert TrustStore(DataDir(data)).publisher_keys() == tuple(server.publishers)
    # a bundle correctly assigned (server-signed) but published by a key the allow-list does not hold
    bad = server.add_bundle(attacker_bundle, tmp_path / "ekb")
    with server._lock:
        server.publishers.remove(json.loads((attacker_bundle / "signature.json").read_text())["public_key"])
        server.publishers_version += 1
    serial = json.loads(server.assign(server.payload(bad))["payload"])["serial"]
    wait_for(_converged(server, data, serial, "failed"), 60, "refused")
    assert dict(server.phases(serial))["failed"] == "other:untrusted_publisher"
    assert read_active_pointer(data).sha256 == a["sha256"]


def test_a_compromised_server_cannot_add_a_publisher_to_a_device_that_pins_its_own(bundles, attacker_bundle: Path,
                                                                                   server: ScriptedServer, spawn_agent,
                                                                                   tmp_path: Path) -> None:
    # The server (key and all) is the attacker's: it allow-lists its own publisher key and assigns its bundle.
    data = tmp_path / "dev"
    a = server.add_bundle(bundles["pi"], tmp_path / "ekb")
    server.assign(server.payload(a))
    spawn_agent(server.url, data)  # EDGEKIT_AGENT_TRUSTED_KEYS: the session's publisher key (tests/conftest.py)
    wait_for(_converged(server, data, 1), 60, "A active")
    bad = server.add_bundle(attacker_bundle, tmp_path / "ekb")  # add_bundle allow-lists its signer
    serial = json.loads(server.assign(server.payload(bad))["payload"])["serial"]
    wait_for(_converged(server, data, serial, "failed"), 60, "refused")
    assert dict(server.phases(serial))["failed"] == "other:untrusted_publisher"
    assert read_active_pointer(data).sha256 == a["sha256"]


def _rotation(old: Ed25519PrivateKey, new: Ed25519PrivateKey, sequence: int, signer: Ed25519PrivateKey | None = None) -> dict:
    old_pub, new_pub = signing.public_key_b64(old), signing.public_key_b64(new)
    return sign_document(signer or old, {"type": ROTATION_TYPE, "sequence": sequence, "old_key_id": signing.fingerprint(old_pub),
                                         "old_public_key": old_pub, "new_key_id": signing.fingerprint(new_pub),
                                         "new_public_key": new_pub, "issued_at": "2026-12-01T00:00:00Z"})


def test_agent_follows_a_rotation_and_refuses_a_forged_one_and_the_old_key(bundles, server: ScriptedServer, spawn_agent,
                                                                           tmp_path: Path) -> None:
    data = tmp_path / "dev"
    a = server.add_bundle(bundles["pi"], tmp_path / "ekb")
    b = server.add_bundle(bundles["pi_b"], tmp_path / "ekb")
    server.assign(server.payload(a))
    spawn_agent(server.url, data)
    wait_for(_converged(server, data, 1), 60, "A active")
    old = server.key

    # forged: a rotation away from the pinned key, signed by the attacker's key, then an assignment signed by it
    attacker = Ed25519PrivateKey.generate()
    with server._lock:
        server.rotations = [_rotation(old, attacker, 1, signer=attacker)]
    serial = json.loads(server.assign(server.payload(b), attacker)["payload"])["serial"]
    wait_for(_converged(server, data, serial, "failed"), 60, "forged rotation refused")
    assert dict(server.phases(serial))["failed"] == "bad_signature"
    assert TrustStore(DataDir(data)).server_key(json.loads((data / "identity.json").read_text())) == server.public_key

    # the real rotation, signed by the pinned key: the agent switches without re-enrolling
    new = Ed25519PrivateKey.generate()
    with server._lock:
        server.rotations = [_rotation(old, new, 1)]
        server.key, server.public_key = new, signing.public_key_b64(new)
    serial = json.loads(server.assign(server.payload(b))["payload"])["serial"]
    wait_for(_converged(server, data, serial), 60, "B active after the rotation")
    assert read_active_pointer(data).sha256 == b["sha256"]
    assert json.loads((data / "trust.json").read_text())["server_public_key"] == server.public_key
    assert json.loads((data / "identity.json").read_text())["device_token"] == server.token  # no re-enrollment
    from device_agents.status import agent_status

    trust = agent_status(data)["trust"]
    assert trust["server_key_id"] == signing.fingerprint(server.public_key) and trust["rotation_sequence"] == 1

    # the replayed old key: an assignment signed by the key that was rotated away is refused
    serial = json.loads(server.assign(server.payload(a), old)["payload"])["serial"]
    wait_for(_converged(server, data, serial, "failed"), 60, "old key refused")
    assert dict(server.phases(serial))["failed"] == "bad_signature"
    assert read_active_pointer(data).sha256 == b["sha256"]


def test_trust_store_refuses_replayed_allow_lists_and_keeps_what_it_had(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pub = signing.public_key_b64(key)
    identity = {"server_public_key": pub}
    store = TrustStore(DataDir(tmp_path).ensure())

    def doc(version: int, keys: list[str], signer: Ed25519PrivateKey = key) -> dict:
        payload = {"type": PUBLISHERS_TYPE, "version": version, "server_key_id": signing.fingerprint(pub),
                   "publishers": [{"key_id": signing.fingerprint(k), "public_key": k, "label": ""} for k in keys],
                   "issued_at": "2026-12-01T00:00:00Z"}
        return {"server_key": {"public_key": pub}, "rotations": [], "publishers": sign_document(signer, payload)}

    p1, p2 = (signing.public_key_b64(Ed25519PrivateKey.generate()) for _ in range(2))
    store.update(identity, doc(3, [p1, p2]))
    assert store.publisher_keys() == (p1, p2)
    with pytest.raises(VerificationError) as e:  # an older list (which still held a removed key) replayed
        store.update(identity, doc(2, [p1]))
    assert e.value.reason == "replayed_serial"
    with pytest.raises(VerificationError) as e:  # signed by someone else
        store.update(identity, doc(9, [p1], Ed25519PrivateKey.generate()))
    assert e.value.reason == "bad_signature"
    assert store.publisher_keys() == (p1, p2)
    assert store.effective_publishers((p2,)) == (p2,)  # device-pinned keys narrow the server's list


def test_real_server_key_rotation_reaches_a_running_agent(start_fleet_server, fleet_bundles, spawn_agent, tmp_path: Path,
                                                          run_cli) -> None:
    server = start_fleet_server(process=True)
    admin = server.admin
    for ekb in (fleet_bundles.ekb["v1"]["raspberry-pi-5"], fleet_bundles.ekb["v2"]["raspberry-pi-5"]):
        assert upload(admin, "digits", [ekb]).status_code == 201
    data = tmp_path / "dev"
    spawn_agent(server.url, data, token=server.enroll_token)
    wait_for(lambda: admin.get("/v1/devices").json(), 60, "enrolled")
    before = admin.get("/v1/server/public-key").json()["key_id"]
    code, out, err = run_cli("server", "key", "rotate", "--server", server.url, "--token", server.admin_token, "--json")
    assert code == 0, err
    rotated = json.loads(out)
    assert rotated["old_key_id"] == before and rotated["new_key_id"] == admin.get("/v1/server/public-key").json()["key_id"]
    for version in ("1.2.3", "1.3.0"):
        r = admin.post("/v1/rollouts", json={"model": "digits", "version": version, "selector": {"profiles": ["raspberry-pi-5"]},
                                             "waves": [100], "gates": {}, "wave_timeout_s": 120})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        done = wait_for(lambda: (x := admin.get(f"/v1/rollouts/{rid}").json())["state"] in ("completed", "failed", "rolled_back") and x,
                        120, f"rollout {version}")
        assert done["state"] == "completed", json.dumps(done)[:1500]
    trust = json.loads((data / "trust.json").read_text())
    assert trust["key_id"] == rotated["new_key_id"] and trust["rotation_sequence"] == 1
    server.restart()  # the new key survives a restart
    assert server.admin.get("/v1/server/public-key").json()["key_id"] == rotated["new_key_id"]
