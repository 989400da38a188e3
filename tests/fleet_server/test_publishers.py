"""The publisher allow-list on the server: only bundles signed by an allowed key are stored (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path

from edgekit import signing
from edgekit.trust import verify_publishers
from fleet_support import FleetBundles, LiveServer, upload


def _flip_model_byte(d: Path) -> None:
    m = json.loads((d / "manifest.json").read_text())
    model = d / m["file"]
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))


def _fresh_key(tmp_path: Path, name: str) -> tuple[Path, str]:
    path = tmp_path / f"{name}.pem"
    return path, signing.public_key_b64(signing.load_or_create_key(path, passphrase=None))


def test_tampered_resigned_bundle_is_refused_and_nothing_is_stored(live_server: LiveServer, fleet_bundles: FleetBundles,
                                                                     tmp_path: Path) -> None:
    # The red-team case: one model byte flipped, the manifest hash updated, re-signed with a fresh key.
    key_path, pub = _fresh_key(tmp_path, "attacker")
    ekb = fleet_bundles.make("tampered-resigned", files=_flip_model_byte, key_path=key_path)
    r = upload(live_server.admin, "digits", [ekb])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "untrusted_publisher" and signing.fingerprint(pub) in err["message"], err
    assert live_server.admin.get("/v1/models").json() == []
    assert not any(p.is_file() for p in (live_server.data_dir / "artifacts").rglob("*") if not p.name.startswith("."))


def test_allow_list_add_list_remove_decides_what_is_stored(live_server: LiveServer, fleet_bundles: FleetBundles, tmp_path: Path) -> None:
    admin = live_server.admin
    session_pub = signing.public_key_b64(signing.load_or_create_key())
    assert [p["public_key"] for p in admin.get("/v1/publishers").json()] == [session_pub]
    key_path, pub = _fresh_key(tmp_path, "ci")
    ekb = fleet_bundles.make("ci-signed", version="7.0.0", key_path=key_path)
    assert upload(admin, "digits", [ekb]).json()["error"]["code"] == "untrusted_publisher"

    r = admin.post("/v1/publishers", json={"public_key": pub, "label": "ci-main"})
    assert r.status_code == 201, r.text
    key_id = r.json()["key_id"]
    assert key_id == signing.fingerprint(pub) and r.json()["label"] == "ci-main"
    assert admin.post("/v1/publishers", json={"public_key": pub}).status_code == 409
    assert upload(admin, "digits", [ekb]).status_code == 201

    assert admin.delete(f"/v1/publishers/{key_id}").status_code == 200
    assert admin.delete(f"/v1/publishers/{key_id}").status_code == 404
    again = fleet_bundles.make("ci-signed-2", version="7.0.1", key_path=key_path)
    assert upload(admin, "digits", [again]).json()["error"]["code"] == "untrusted_publisher"
    # malformed keys and ids are 422, never stored
    for bad in ("not base64", "A" * 44, pub[:-4]):
        assert admin.post("/v1/publishers", json={"public_key": bad}).status_code == 422, bad
    assert admin.delete("/v1/publishers/NOT-AN-ID").status_code == 422
    # only admins manage the list
    assert live_server.client(live_server.enroll_token).get("/v1/publishers").status_code == 403


def test_devices_get_the_allow_list_signed_by_the_server_key_and_its_version_grows(live_server: LiveServer, tmp_path: Path) -> None:
    admin = live_server.admin
    r = live_server.client(live_server.enroll_token).post("/v1/devices/enroll", json={"name": "d1", "profile": "raspberry-pi-5",
                                                                                      "tags": [], "facts": {}})
    assert r.status_code == 201, r.text
    device = live_server.client(r.json()["device_token"])
    server_key = r.json()["server_public_key"]
    first = device.get("/v1/device/trust").json()
    assert first["server_key"]["public_key"] == server_key and first["rotations"] == []
    allow = verify_publishers(first["publishers"], server_public_key=server_key)
    assert allow.keys == (signing.public_key_b64(signing.load_or_create_key()),)
    _, pub = _fresh_key(tmp_path, "second")
    assert admin.post("/v1/publishers", json={"public_key": pub}).status_code == 201
    second = verify_publishers(device.get("/v1/device/trust").json()["publishers"], server_public_key=server_key,
                               min_version=allow.version)
    assert second.version > allow.version and pub in second.keys


def test_push_of_an_unpublished_bundle_exits_with_error_and_hint(live_server: LiveServer, fleet_bundles: FleetBundles, run_cli,
                                                                  tmp_path: Path) -> None:
    key_path, _ = _fresh_key(tmp_path, "attacker")
    ekb = fleet_bundles.make("push-tampered", files=_flip_model_byte, key_path=key_path)
    code, out, err = run_cli("push", ekb, "--server", live_server.url, "--token", live_server.admin_token)
    assert code != 0
    assert "Error:" in err and "untrusted_publisher" in err and "Hint:" in err and "Traceback" not in err, err
    assert live_server.admin.get("/v1/models").json() == []


def test_publisher_cli_on_the_database(run_cli, tmp_path: Path) -> None:
    data = tmp_path / "server"
    code, out, err = run_cli("server", "publisher", "add", "--label", "build", "--data-dir", data, "--json")
    assert code == 0, err
    row = json.loads(out)
    assert row["public_key"] == signing.public_key_b64(signing.load_or_create_key())
    code, out, err = run_cli("server", "publisher", "add", "--data-dir", data)
    assert code != 0 and "Error:" in err and "already" in err
    code, out, _ = run_cli("server", "publisher", "list", "--data-dir", data, "--json")
    listed = json.loads(out)
    assert [p["key_id"] for p in listed["publishers"]] == [row["key_id"]] and listed["version"] == 1
    assert run_cli("server", "publisher", "remove", row["key_id"], "--data-dir", data)[0] == 0
    code, _, err = run_cli("server", "publisher", "remove", row["key_id"], "--data-dir", data)
    assert code != 0 and "Error:" in err and "Hint:" in err
    code, _, err = run_cli("server", "publisher", "add", "garbage-key", "--data-dir", data)
    assert code != 0 and "Error:" in err and "Hint:" in err
