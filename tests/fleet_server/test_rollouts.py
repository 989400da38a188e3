"""The rollout engine: waves, gates, reverts, pause/resume/promote/rollback, serials and signatures."""

from __future__ import annotations

import math

import pytest

from fleet_support import SimDevice, upload, wait_for

GATES = {"max_failure_rate": 0.0, "min_agreement": 0.9, "max_p95_ratio": 1.5, "max_peak_rss_mb": 100}


def fleet(server, bundles, n: int, *, versions=("v1",), profile: str = "raspberry-pi-5", prefix: str = "pi") -> list[SimDevice]:
    admin = server.admin
    for v in versions:
        r = upload(admin, "digits", [bundles.ekb[v]["raspberry-pi-5"], bundles.ekb[v]["coral-edgetpu"]])
        assert r.status_code == 201, r.text
    return [SimDevice(server, f"{prefix}-{i}", profile=profile, tags=["shop-1"]).enroll() for i in range(n)]


def rollout(server, version: str = "1.2.3", **body) -> dict:
    r = server.admin.post("/v1/rollouts", json={"model": "digits", "version": version, **body})
    assert r.status_code == 201, r.text
    return r.json()


def get(server, rollout_id: str) -> dict:
    return server.admin.get(f"/v1/rollouts/{rollout_id}").json()


def wave_ids(ro: dict, i: int) -> set[str]:
    return {d["device_id"] for d in ro["waves"][i]["devices"]}


def run_wave(devices: list[SimDevice], ids: set[str], **install) -> dict[str, dict]:
    """Every device of ``ids`` polls, checks its install assignment and installs it."""
    payloads = {}
    for d in devices:
        if d.device_id in ids:
            p = d.poll()
            assert p is not None and p["action"] == "install", p
            d.install(p, **install)
            payloads[d.device_id] = p
    return payloads


def test_waves_pass_their_gates_and_complete(live_server, fleet_bundles):
    devices = fleet(live_server, fleet_bundles, 10)
    ro = rollout(live_server, waves=[10, 50, 100], gates=GATES)
    assert [len(w["devices"]) for w in ro["waves"]] == [1, 4, 5]
    assert [w["state"] for w in ro["waves"]] == ["running", "pending", "pending"]
    seen: set[str] = set()
    for i in range(3):
        ro = wait_for(lambda: (x := get(live_server, ro["id"]))["waves"][i]["state"] == "running" and x)
        ids = wave_ids(ro, i)
        # devices of later waves have nothing yet
        later = {d.device_id for d in devices} - ids - seen
        assert all(d.desired() is None for d in devices if d.device_id in later)
        payloads = run_wave(devices, ids, p95_ms=2.0, baseline_p95=None)
        assert {p["artifact"]["profile"] for p in payloads.values()} == {"raspberry-pi-5"}
        seen |= ids
    ro = wait_for(lambda: (x := get(live_server, ro["id"]))["state"] == "completed" and x)
    for w in ro["waves"]:
        assert w["state"] == "passed"
        assert {g["gate"] for g in w["gate_results"]} == {"max_failure_rate", "min_agreement", "max_peak_rss_mb", "require_golden"}
        assert all(g["passed"] for g in w["gate_results"])
        assert all(d["phase"] == "activated" and d["metrics"]["p95_ms"] == 2.0 for d in w["devices"])
    listed = live_server.admin.get("/v1/devices").json()
    assert {(d["active"]["model"], d["active"]["version"]) for d in listed} == {("digits", "1.2.3")}


def test_wave_split_matches_the_protocol(live_server, fleet_bundles):
    from fleet_server.services.rollouts import split_waves

    assert split_waves(10, [5, 25, 100]) == [(5, 1), (25, 3), (100, 10)]
    assert split_waves(2, [5, 25, 100]) == [(5, 1), (25, 2)]  # at least one per wave, empty waves dropped
    assert split_waves(1, [5, 25, 100]) == [(5, 1)]
    assert split_waves(200, [5, 25, 100]) == [(5, 10), (25, 50), (100, 200)]
    for n in range(1, 40):
        ups = [u for _, u in split_waves(n, [5, 25, 100])]
        assert ups[-1] == n and all(b > a for a, b in zip(ups, ups[1:]))
        assert ups[0] == max(1, math.ceil(0.05 * n))


@pytest.mark.parametrize("failure", ["p95", "failed", "agreement", "rss"])
def test_a_failed_gate_reverts_the_wave_and_stops_the_rollout(live_server, fleet_bundles, failure):
    devices = fleet(live_server, fleet_bundles, 6, versions=("v1", "v2"))
    first = rollout(live_server, waves=[100])
    run_wave(devices, wave_ids(first, 0), p95_ms=1.0)
    wait_for(lambda: get(live_server, first["id"])["state"] == "completed")
    v1_sha = fleet_bundles.ekb["v1"]["raspberry-pi-5"]
    import hashlib

    v1_sha = hashlib.sha256(v1_sha.read_bytes()).hexdigest()
    serial_before = {d.device_id: d.last_serial for d in devices}

    ro = rollout(live_server, version="1.3.0", waves=[34, 100], gates=GATES)
    wave0, wave1 = wave_ids(ro, 0), wave_ids(ro, 1)
    assert len(wave0) == 3 and len(wave1) == 3
    bad = sorted(wave0)[0]
    for d in devices:
        if d.device_id not in wave0:
            continue
        p = d.poll()
        assert p["version"] == "1.3.0" and p["serial"] > serial_before[d.device_id]
        kw = {"p95_ms": 1.0, "baseline_p95": 1.0}
        if d.device_id == bad:
            kw.update({"p95": {"p95_ms": 3.0}, "failed": {"fail": "load_failed"}, "agreement": {"agreement": 0.5},
                       "rss": {"peak_rss_mb": 500.0}}[failure])
        d.install(p, **kw)
    ro = wait_for(lambda: (x := get(live_server, ro["id"]))["state"] == "failed" and x)
    gate = {"p95": "max_p95_ratio", "failed": "max_failure_rate", "agreement": "min_agreement", "rss": "max_peak_rss_mb"}[failure]
    assert gate in ro["reason"]
    assert [w["state"] for w in ro["waves"]] == ["failed", "pending"]
    failing = [g for g in ro["waves"][0]["gate_results"] if g["passed"] is False]
    # a golden agreement of 0.5 also fails the safe default gate require_golden (the device says golden_passed: false)
    assert [g["gate"] for g in failing] == [gate] + (["require_golden"] if failure == "agreement" else [])
    assert failing[0]["device_id"] in (bad, None)
    for d in devices:
        if d.device_id in wave0:  # every device of the failed wave is told to go back to 1.2.3
            p = d.poll()
            assert p["action"] == "revert" and p["rollout_id"] == ro["id"] and p["reason"] == "gate_failed"
            assert p["artifact"]["sha256"] == v1_sha and p["artifact"]["profile"] == "raspberry-pi-5"
            assert d.report(p["serial"], "rolled_back", reason="gate_failed").json() == {"accepted": True, "duplicate": False}
        else:  # later waves never receive the version
            assert d.poll() is None
            assert d.desired()["version"] == "1.2.3" and d.last_serial == serial_before[d.device_id]
    for dev in live_server.admin.get("/v1/devices").json():
        assert dev["active"]["version"] == "1.2.3", dev
    # the engine keeps running but a failed rollout stays failed
    assert live_server.admin.post(f"/v1/rollouts/{ro['id']}/resume").status_code == 409


def test_revert_of_a_device_with_no_previous_model_carries_no_artifact(live_server, fleet_bundles):
    devices = fleet(live_server, fleet_bundles, 2)
    ro = rollout(live_server, waves=[100], gates={"max_failure_rate": 0.0})
    for d in devices:
        p = d.poll()
        d.install(p, fail="golden_mismatch" if d is devices[0] else None)
    ro = wait_for(lambda: (x := get(live_server, ro["id"]))["state"] == "failed" and x)
    for d in devices:
        p = d.poll()
        assert p["action"] == "revert" and p["artifact"] is None


def test_pause_resume_promote_and_rollback(live_server, fleet_bundles):
    admin = live_server.admin
    devices = fleet(live_server, fleet_bundles, 8)
    ro = rollout(live_server, waves=[25, 50, 75, 100])
    rid = ro["id"]
    assert admin.post(f"/v1/rollouts/{rid}/resume").status_code == 409
    r = admin.post(f"/v1/rollouts/{rid}/pause")
    assert r.status_code == 200 and r.json()["state"] == "paused"
    assert admin.post(f"/v1/rollouts/{rid}/pause").status_code == 409
    run_wave(devices, wave_ids(ro, 0))  # the running wave is still decided while paused...
    ro = wait_for(lambda: (x := get(live_server, rid))["waves"][0]["state"] == "passed" and x)
    assert ro["state"] == "paused" and ro["waves"][1]["state"] == "pending"  # ...but no new wave starts
    assert all(d.desired() is None for d in devices if d.device_id in wave_ids(ro, 1))
    r = admin.post(f"/v1/rollouts/{rid}/resume")
    assert r.status_code == 200 and r.json()["state"] == "running"
    ro = wait_for(lambda: (x := get(live_server, rid))["waves"][1]["state"] == "running" and x)
    # promote: every remaining device gets it now, as one last wave (merged with what is pending)
    r = admin.post(f"/v1/rollouts/{rid}/promote")
    assert r.status_code == 200, r.text
    ro = r.json()
    assert [w["state"] for w in ro["waves"]] == ["passed", "running", "running"]
    assert ro["waves"][2]["percent"] == 100 and len(ro["waves"][2]["devices"]) == 4
    for i in (1, 2):
        run_wave(devices, wave_ids(ro, i))
    ro = wait_for(lambda: (x := get(live_server, rid))["state"] == "completed" and x)
    assert admin.post(f"/v1/rollouts/{rid}/promote").status_code == 409
    # rollback after completion: every device goes back to what it had before (nothing)
    r = admin.post(f"/v1/rollouts/{rid}/rollback")
    assert r.status_code == 200 and r.json()["state"] == "rolled_back"
    for d in devices:
        p = d.poll()
        assert p["action"] == "revert" and p["artifact"] is None and p["reason"] == "server_rollback"
        assert d.report(p["serial"], "rolled_back", reason="server_rollback").status_code == 200
    assert admin.post(f"/v1/rollouts/{rid}/rollback").status_code == 409
    assert all(d["active"] is None for d in admin.get("/v1/devices").json())
    assert admin.post("/v1/rollouts/ro_nope/pause").status_code == 404


def test_rollback_mid_rollout_reverts_only_devices_that_got_it(live_server, fleet_bundles):
    admin = live_server.admin
    devices = fleet(live_server, fleet_bundles, 4)
    ro = rollout(live_server, waves=[50, 100])
    got = wave_ids(ro, 0)
    r = admin.post(f"/v1/rollouts/{ro['id']}/rollback")
    assert r.status_code == 200
    assert [w["state"] for w in r.json()["waves"]] == ["rolled_back", "pending"]
    for d in devices:
        p = d.poll()
        if d.device_id in got:
            assert p["action"] == "revert"
        else:
            assert p is None


def test_rollout_requests_that_cannot_work(live_server, fleet_bundles):
    admin = live_server.admin
    fleet(live_server, fleet_bundles, 2)
    SimDevice(live_server, "big-1", profile="x86-64-avx512-server").enroll()

    def err(body: dict, status: int, code: str) -> str:
        r = admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", **body})
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code
        return r.json()["error"]["message"]

    err({"version": "9.9.9"}, 404, "not_found")
    err({"model": "nope"}, 404, "not_found")
    assert "no enrolled device matches" in err({"selector": {"tags": ["nowhere"]}}, 400, "no_matching_devices")
    assert "no artifact" in err({"selector": {"profiles": ["x86-64-avx512-server"]}}, 400, "no_matching_devices")
    for waves in ([], [50, 25, 100], [5, 25], [0, 100], [5, 5, 100], [150]):
        err({"waves": waves}, 422, "invalid_request")
    err({"gates": {"max_failure_rate": 2}}, 422, "invalid_request")
    err({"gates": {"unknown_gate": 1}}, 422, "invalid_request")
    err({"wave_timeout_s": 0}, 422, "invalid_request")
    ro = rollout(live_server, waves=[100])
    assert ro["skipped"]["count"] == 1
    assert "running rollout" in err({}, 409, "conflict")
    assert admin.get("/v1/rollouts").json()["total"] == 1  # the list (tests/fleet_server/test_field_ops.py covers filters)


def test_wave_timeout_counts_silent_devices_as_failed(live_server, fleet_bundles):
    devices = fleet(live_server, fleet_bundles, 2)
    ro = rollout(live_server, waves=[100], gates={"max_failure_rate": 0.5}, wave_timeout_s=1)
    quiet = None
    for d in devices:
        p = d.poll()
        if quiet is None:
            quiet = d  # polls, then never reports
        else:
            d.install(p)
    ro = wait_for(lambda: (x := get(live_server, ro["id"]))["state"] in ("failed", "completed") and x)
    assert ro["state"] == "completed"  # 1 of 2 failed = 0.5 ≤ 0.5
    silent = next(d for d in ro["waves"][0]["devices"] if d["device_id"] == quiet.device_id)
    assert silent["reason"] == "timeout" and silent["finished"]
    assert ro["waves"][0]["gate_results"][0]["value"] == 0.5


def test_serials_only_grow_and_every_assignment_verifies(live_server, fleet_bundles):
    from fleet_support import verify_assignment

    admin = live_server.admin
    devices = fleet(live_server, fleet_bundles, 3, versions=("v1", "v2"))
    key = live_server.client().get("/v1/server/public-key").json()
    assert devices[0].public_key == key["public_key"]
    history: dict[str, list[int]] = {d.device_id: [] for d in devices}
    for version in ("1.2.3", "1.3.0"):
        ro = rollout(live_server, version=version, waves=[100])
        for d in devices:
            p = d.poll()
            history[d.device_id].append(p["serial"])
            assert p["device_id"] == d.device_id and p["type"] == "edgekit.assignment/v1" and p["issued_at"] < p["expires_at"]
            d.install(p)
        wait_for(lambda: get(live_server, ro["id"])["state"] == "completed")
    admin.post(f"/v1/rollouts/{ro['id']}/rollback")
    for d in devices:
        p = d.poll()
        history[d.device_id].append(p["serial"])
        signed = d.http.get("/v1/device/desired").json()["assignment"]
        assert signed["key_id"] == key["key_id"]
        verify_assignment(signed, key["public_key"])
        tampered = dict(signed, payload=signed["payload"].replace('"revert"', '"install"'))
        with pytest.raises(Exception):
            verify_assignment(tampered, key["public_key"])
    for serials in history.values():
        assert serials == sorted(set(serials)) and len(serials) == 3
    assert admin.get(f"/v1/devices/{devices[0].device_id}").json()["serial"] == history[devices[0].device_id][-1]
