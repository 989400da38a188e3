"""Enrollment, the desired-state route (ETag/304, re-issue), reports and telemetry."""

from __future__ import annotations

import time

from fleet_support import SimDevice, upload, wait_for


def test_enroll_validates_and_names_are_unique(live_server):
    c = live_server.client(live_server.enroll_token)
    r = c.post("/v1/devices/enroll", json={"name": "pi-1", "profile": "raspberry-pi-5", "tags": ["shop-12"], "facts": {"ram_mb": 8192}})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["device_token"].startswith("ekdev_") and body["poll_interval_s"] == 60
    assert body["server_public_key"] == live_server.client().get("/v1/server/public-key").json()["public_key"]
    r = c.post("/v1/devices/enroll", json={"name": "pi-1", "profile": "raspberry-pi-5"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    r = c.post("/v1/devices/enroll", json={"name": "pi-2", "profile": "toaster"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_profile"
    r = c.post("/v1/devices/enroll", json={"name": "pi-3", "profile": "/etc/passwd.yaml"})
    assert r.status_code == 400
    for bad in ({"name": "../x", "profile": "raspberry-pi-5"}, {"name": "ok", "profile": "raspberry-pi-5", "tags": ["bad tag"]},
                {"name": "ok", "profile": "raspberry-pi-5", "extra": 1}, {"profile": "raspberry-pi-5"}):
        assert c.post("/v1/devices/enroll", json=bad).status_code == 422, bad
    devices = live_server.admin.get("/v1/devices").json()
    assert [d["name"] for d in devices] == ["pi-1"]
    assert devices[0]["tags"] == ["shop-12"] and devices[0]["facts"] == {"ram_mb": 8192} and devices[0]["active"] is None
    assert live_server.admin.get("/v1/devices", params={"tag": "other"}).json() == []
    assert live_server.admin.get("/v1/devices", params={"profile": "raspberry-pi-5", "tag": "shop-12"}).json()[0]["id"] == body["device_id"]
    assert live_server.admin.get("/v1/devices/dev_unknown").status_code == 404


def test_desired_uses_etags_and_records_last_seen(live_server, fleet_bundles):
    d = SimDevice(live_server, "pi-etag").enroll()
    r = d.http.get("/v1/device/desired")
    assert r.status_code == 200 and r.json() == {"poll_interval_s": 60, "assignment": None}
    etag = r.headers["etag"]
    assert d.http.get("/v1/device/desired", headers={"If-None-Match": etag}).status_code == 304
    assert d.http.get("/v1/device/desired", headers={"If-None-Match": '"other"'}).status_code == 200
    assert upload(live_server.admin, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"]]).status_code == 201
    assert live_server.admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "waves": [100]}).status_code == 201
    r = d.http.get("/v1/device/desired", headers={"If-None-Match": etag})
    assert r.status_code == 200 and r.headers["etag"] != etag and r.json()["assignment"]["payload"]
    assert d.http.get("/v1/device/desired", headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    seen = wait_for(lambda: live_server.admin.get(f"/v1/devices/{d.device_id}").json()["last_seen"])
    assert seen.startswith("20")


def test_an_assignment_past_half_its_life_is_reissued_with_a_new_serial(start_fleet_server, fleet_bundles):
    server = start_fleet_server(assignment_ttl_s=2)
    d = SimDevice(server, "pi-ttl").enroll()
    assert upload(server.admin, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"]]).status_code == 201
    assert server.admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "waves": [100]}).status_code == 201
    first = d.poll()
    time.sleep(1.2)  # past half of the 2 s lifetime
    second = d.poll()
    assert second is not None and second["serial"] > first["serial"]
    for k in ("action", "artifact", "model", "version", "rollout_id"):
        assert second[k] == first[k]
    assert second["expires_at"] > first["expires_at"]
    # reports on the old serial still count for the same rollout
    assert d.report(first["serial"], "downloaded").json()["accepted"]
    assert d.report(second["serial"], "downloaded").json() == {"accepted": False, "duplicate": True}


def test_reports_are_idempotent_and_validated(live_server, fleet_bundles):
    d = SimDevice(live_server, "pi-rep").enroll()
    assert d.report(1, "downloaded").status_code == 403  # no assignment yet
    assert upload(live_server.admin, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"]]).status_code == 201
    ro = live_server.admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "waves": [100]}).json()
    p = d.poll()
    assert d.report(p["serial"], "downloaded").json() == {"accepted": True, "duplicate": False}
    assert d.report(p["serial"], "downloaded").json() == {"accepted": False, "duplicate": True}
    assert d.report(p["serial"] + 100, "verified").status_code == 403
    bad = [
        {"serial": p["serial"], "phase": "exploded"},
        {"serial": p["serial"], "phase": "failed"},  # failed needs a reason
        {"serial": p["serial"], "phase": "failed", "reason": "because"},
        {"serial": p["serial"], "phase": "rolled_back", "reason": "other:"},
        {"serial": p["serial"], "phase": "profiled", "metrics": {"p95_ms": "fast"}},
        {"serial": p["serial"], "phase": "profiled", "metrics": {"golden_top1_agreement": 1.5}},
        {"serial": 0, "phase": "verified"},
        {"serial": "1", "phase": "verified", "extra": True},
    ]
    for body in bad:
        r = d.http.post("/v1/device/reports", json=body)
        assert r.status_code == 422, (body, r.text)
    # non-finite numbers (json.dumps writes NaN/Infinity) are kept as null, never a 500 (PostgreSQL's JSON refuses them)
    r = d.http.post("/v1/device/reports", content=f'{{"serial": {p["serial"]}, "phase": "profiled", "metrics": '
                    '{"p95_ms": 1.0, "golden_max_abs_err": Infinity, "extra": [NaN, 1]}}', headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert d.report(p["serial"], "failed", reason="other:disk full").json()["accepted"]
    # no gates given: the safe default max_failure_rate=0 fails the wave on the one failed device
    ro = wait_for(lambda: (x := live_server.admin.get(f"/v1/rollouts/{ro['id']}").json())["state"] == "failed" and x)
    assert "max_failure_rate" in ro["reason"]
    dev = ro["waves"][0]["devices"][0]
    assert dev["phase"] == "failed" and dev["reason"] == "other:disk full"
    assert dev["metrics"] == {"p95_ms": 1.0, "golden_max_abs_err": None, "extra": [None, 1]}
    assert live_server.admin.get(f"/v1/devices/{d.device_id}").json()["phase"] == "failed"


def test_telemetry_roundtrip(live_server, fleet_bundles):
    import hashlib

    a = SimDevice(live_server, "pi-t1").enroll()
    b = SimDevice(live_server, "pi-t2").enroll()
    assert upload(live_server.admin, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"]]).status_code == 201
    sha = hashlib.sha256(fleet_bundles.ekb["v1"]["raspberry-pi-5"].read_bytes()).hexdigest()

    def point(minute: str, model_sha: str | None = sha) -> dict:
        return {"minute": minute, "model_sha256": model_sha, "model_version": "1.2.3", "count": 120, "errors": 1, "escalations": 7,
                "degraded": 0, "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0, "max": 9.0}, "confidence_hist": [0] * 9 + [120],
                "sources": {"device": 113, "cloud": 7}}

    r = a.http.post("/v1/device/telemetry", json={"points": [point("2026-11-23T10:41:00Z"), point("2026-11-23T10:42:00Z")], "dropped": 3})
    assert r.status_code == 202 and r.json() == {"accepted": 2}
    assert b.http.post("/v1/device/telemetry", json={"points": [point("2026-11-23T10:43:00Z", None)], "dropped": 0}).status_code == 202
    t = live_server.admin.get("/v1/telemetry").json()
    assert len(t["points"]) == 3 and t["dropped"] == 3
    assert t["points"][0]["minute"] == "2026-11-23T10:43:00Z" and t["points"][0]["device_id"] == b.device_id
    mine = live_server.admin.get("/v1/telemetry", params={"device_id": a.device_id}).json()
    assert [p["minute"] for p in mine["points"]] == ["2026-11-23T10:42:00Z", "2026-11-23T10:41:00Z"]
    assert mine["points"][0]["sources"] == {"device": 113, "cloud": 7} and mine["points"][0]["latency_ms"]["p95"] == 2.0
    assert len(live_server.admin.get("/v1/telemetry", params={"model": "digits"}).json()["points"]) == 2
    assert len(live_server.admin.get("/v1/telemetry", params={"since": "2026-11-23T10:42:00Z"}).json()["points"]) == 2
    assert len(live_server.admin.get("/v1/telemetry", params={"limit": 1}).json()["points"]) == 1
    assert live_server.admin.get("/v1/telemetry", params={"limit": 0}).status_code == 422
    assert live_server.admin.get("/v1/telemetry", params={"since": "yesterday"}).status_code == 422
    too_many = {"points": [point("2026-11-23T10:41:00Z")] * 1001}
    assert a.http.post("/v1/device/telemetry", json=too_many).status_code == 422
    assert a.http.post("/v1/device/telemetry", json={"points": [dict(point("2026-11-23T10:41:00Z"), count=-1)]}).status_code == 422
    assert a.http.post("/v1/device/telemetry", json={"points": [], "dropped": -1}).status_code == 422
    nan = '{"points": [{"minute": "2026-11-23T10:41:00Z", "count": 1, "latency_ms": {"p50": NaN}}]}'
    assert a.http.post("/v1/device/telemetry", content=nan, headers={"content-type": "application/json"}).status_code == 422
    assert len(live_server.admin.get("/v1/telemetry").json()["points"]) == 3


def test_json_bodies_over_the_limit_are_413(start_fleet_server):
    server = start_fleet_server(max_json_mb=0.01)  # 10 KB
    d = SimDevice(server, "pi-big").enroll()
    point = {"minute": "2026-11-23T10:41:00Z", "count": 1}
    big = {"points": [point] * 600}  # ~25 KB
    r = d.http.post("/v1/device/telemetry", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"points": ['
        yield b",".join([b'{"minute": "2026-11-23T10:41:00Z", "count": 1}'] * 600)
        yield b"]}"

    r = d.http.post("/v1/device/telemetry", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    small = b'{"points": [{"minute": "2026-11-23T10:41:00Z", "count": 1}]}'
    r = d.http.post("/v1/device/telemetry", content=iter([small[:10], small[10:]]), headers={"content-type": "application/json"})
    assert r.status_code == 202 and r.json() == {"accepted": 1}
    assert len(server.admin.get("/v1/telemetry").json()["points"]) == 1
