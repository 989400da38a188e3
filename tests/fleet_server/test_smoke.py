"""End to end on a live server: upload, enroll, rollout, poll, download, report, complete."""

from __future__ import annotations

from fleet_support import SimDevice, upload, wait_for


def test_upload_enroll_rollout_complete(live_server, fleet_bundles):
    admin = live_server.admin
    r = upload(admin, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"], fleet_bundles.ekb["v1"]["coral-edgetpu"]])
    assert r.status_code == 201, r.text
    mv = r.json()
    assert mv["version"] == "1.2.3" and {a["profile"] for a in mv["artifacts"]} == {"raspberry-pi-5", "coral-edgetpu"}
    assert all(a["validation"]["loads"] and a["validation"]["golden"]["passed"] for a in mv["artifacts"])

    devices = [SimDevice(live_server, f"pi-{i}").enroll() for i in range(3)]
    other = SimDevice(live_server, "server-1", profile="x86-64-avx512-server").enroll()
    assert all(d.poll() is None for d in devices)

    r = admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "waves": [34, 100]})
    assert r.status_code == 201, r.text
    ro = r.json()
    assert ro["skipped"]["count"] == 1 and ro["skipped"]["devices"][0]["device_id"] == other.device_id
    assert [len(w["devices"]) for w in ro["waves"]] == [2, 1]
    first = {d["device_id"] for d in ro["waves"][0]["devices"]}
    polled = {d.device_id: d.poll() for d in devices}
    for d in devices:
        p = polled[d.device_id]
        if d.device_id in first:
            assert p["action"] == "install" and p["artifact"]["profile"] == "raspberry-pi-5"
            d.install(p)
        else:
            assert p is None
    ro = wait_for(lambda: (x := admin.get(f"/v1/rollouts/{ro['id']}").json())["waves"][1]["state"] == "running" and x)
    last = next(d for d in devices if d.device_id not in first)
    p = last.poll()
    last.install(p)
    ro = wait_for(lambda: (x := admin.get(f"/v1/rollouts/{ro['id']}").json())["state"] == "completed" and x)
    assert [w["state"] for w in ro["waves"]] == ["passed", "passed"]
    listed = admin.get("/v1/devices", params={"profile": "raspberry-pi-5"}).json()
    assert {d["active"]["version"] for d in listed} == {"1.2.3"}
