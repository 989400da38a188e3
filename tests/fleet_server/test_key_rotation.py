"""Server key rotation without re-enrolling (SQLite and PostgreSQL): the new key is announced signed by the
old one, desired states are re-signed, a forged rotation and the old key are refused, a crash mid-rotation
is finished (or undone) at the next start."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit import signing
from edgekit.errors import VerificationError
from edgekit.trust import ROTATION_TYPE, follow_rotations, sign_document, verify_publishers
from fleet_support import LiveServer, SimDevice, upload, verify_assignment


def _rollout(server: LiveServer) -> str:
    r = server.admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "selector": {}, "waves": [100], "gates": {}})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_rotation_is_followed_from_the_pinned_key_and_desired_states_are_resigned(live_server: LiveServer, fleet_bundles) -> None:
    admin = live_server.admin
    assert upload(admin, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"]]).status_code == 201
    dev = SimDevice(live_server, "rot-1").enroll()
    _rollout(live_server)
    from fleet_support import wait_for

    before = wait_for(lambda: dev.http.get("/v1/device/desired").json()["assignment"])
    old_key = dev.public_key
    r = admin.post("/v1/server/key/rotate")
    assert r.status_code == 200, r.text
    rot = r.json()
    assert rot["sequence"] == 1 and rot["old_key_id"] == signing.fingerprint(old_key) and rot["resigned_assignments"] >= 1
    trust = dev.http.get("/v1/device/trust").json()
    new_key, seq = follow_rotations(trust["rotations"], pinned_public_key=old_key)
    assert (new_key, seq) == (rot["new_public_key"], 1) == (trust["server_key"]["public_key"], 1)
    verify_publishers(trust["publishers"], server_public_key=new_key)  # the allow-list is signed by the new key
    after = dev.http.get("/v1/device/desired").json()["assignment"]
    assert after["payload"] == before["payload"]  # the same assignment (an agent does not take it up twice) ...
    verify_assignment(after, new_key)  # ... signed by the new key
    with pytest.raises(Exception):
        verify_assignment(after, old_key)
    assert admin.get("/v1/server/public-key").json()["public_key"] == new_key
    # a second rotation chains on the first; a device still at the first key walks both
    assert admin.post("/v1/server/key/rotate").status_code == 200
    chain = live_server.client().get("/v1/server/key-rotations").json()
    assert follow_rotations(chain, pinned_public_key=old_key)[1] == 2
    live_server.restart()  # the key file and the chain survive a restart
    assert live_server.admin.get("/v1/server/public-key").json()["public_key"] == follow_rotations(chain, pinned_public_key=old_key)[0]


def test_a_forged_rotation_and_a_replayed_old_statement_are_not_followed(live_server: LiveServer) -> None:
    pinned = live_server.client().get("/v1/server/public-key").json()["public_key"]
    attacker = Ed25519PrivateKey.generate()
    apub = signing.public_key_b64(attacker)
    forged = sign_document(attacker, {"type": ROTATION_TYPE, "sequence": 1, "old_key_id": signing.fingerprint(pinned),
                                      "old_public_key": pinned, "new_key_id": signing.fingerprint(apub), "new_public_key": apub,
                                      "issued_at": "2026-12-01T00:00:00Z"})
    with pytest.raises(VerificationError) as e:
        follow_rotations([forged], pinned_public_key=pinned)
    assert e.value.reason == "bad_signature"
    assert live_server.admin.post("/v1/server/key/rotate").status_code == 200
    chain = live_server.client().get("/v1/server/key-rotations").json()
    current, seq = follow_rotations(chain, pinned_public_key=pinned)
    # replayed: the same statement again, for a device that already follows the new key, changes nothing
    assert follow_rotations(chain, pinned_public_key=current, last_sequence=seq) == (current, seq)
    # and a statement from a key the device never pinned (the rotated-away one, now perhaps leaked) is skipped
    assert follow_rotations(chain + [forged], pinned_public_key=current, last_sequence=seq) == (current, seq)


def test_a_crash_mid_rotation_is_finished_or_undone_at_start(live_server: LiveServer) -> None:
    key_path = live_server._settings().key_path
    pending = key_path.with_name(key_path.name + ".next")
    before = live_server.client().get("/v1/server/public-key").json()["key_id"]
    # crashed before the transaction committed: the stray new key is dropped
    live_server.stop()
    signing.load_or_create_key(pending, passphrase=None)
    live_server.start()
    assert not pending.exists() and live_server.client().get("/v1/server/public-key").json()["key_id"] == before
    # crashed after the commit, before the rename: the start finishes it
    assert live_server.admin.post("/v1/server/key/rotate").status_code == 200
    rotated = live_server.client().get("/v1/server/public-key").json()["key_id"]
    live_server.stop()
    import shutil

    shutil.copy2(key_path, pending)  # the committed new key, as if the rename had not happened ...
    old_pem = Ed25519PrivateKey.generate()  # ... and some other key in the key file
    from cryptography.hazmat.primitives import serialization

    key_path.write_bytes(old_pem.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    live_server.start()
    assert not pending.exists() and live_server.client().get("/v1/server/public-key").json()["key_id"] == rotated
    assert json.loads(live_server.admin.get("/v1/server/key-rotations").text)[-1]["key_id"] == before
