"""Field statistics per version, field gates after a bake, and governance (named tokens, revocation, audit,
decommission, the rollout list) against the real server on SQLite and PostgreSQL, devices simulated over HTTP."""

from __future__ import annotations

import datetime as dt

import pytest

from fleet_support import SimDevice, upload, wait_for


def _minute(offset_min: int = 0) -> str:
    t = dt.datetime.now(dt.timezone.utc).replace(second=0, microsecond=0) + dt.timedelta(minutes=offset_min)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _point(sha: str, version: str, *, minute: str, count: int, escalations: int = 0, errors: int = 0, degraded: int = 0,
           p95: float = 2.0, hist: list[int] | None = None) -> dict:
    return {"minute": minute, "model_sha256": sha, "model_version": version, "count": count, "errors": errors, "escalations": escalations,
            "degraded": degraded, "latency_ms": {"p50": p95 / 2, "p95": p95, "p99": p95 * 1.5, "max": p95 * 2},
            "confidence_hist": hist or [0] * 9 + [count], "sources": {"device": count}}


def _post(d: SimDevice, points: list[dict]) -> None:
    r = d.http.post("/v1/device/telemetry", json={"points": points})
    assert r.status_code in (200, 202), r.text


def _on_v1(server, bundles, n: int) -> tuple[list[SimDevice], dict[str, str]]:
    """n raspberry-pi-5 devices running 1.2.3 (installed through a rollout); returns them and the version shas."""
    admin = server.admin
    shas = {}
    for v, version in (("v1", "1.2.3"), ("v2", "1.3.0")):
        r = upload(admin, "digits", [bundles.ekb[v]["raspberry-pi-5"]])
        assert r.status_code == 201, r.text
        shas[version] = r.json()["artifacts"][0]["sha256"]
    devices = [SimDevice(server, f"pi-{i}", tags=["field"]).enroll() for i in range(n)]
    ro = admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "waves": [100]}).json()
    for d in devices:
        d.install(d.poll())
    wait_for(lambda: admin.get(f"/v1/rollouts/{ro['id']}").json()["state"] == "completed")
    return devices, shas


def test_version_stats_aggregate_the_field_telemetry_and_validate_filters(live_server, fleet_bundles):
    admin = live_server.admin
    devices, shas = _on_v1(live_server, fleet_bundles, 2)
    # 700 requests, 231 escalated (33%), 20 degraded answers (answers, not errors), 7 requests without an answer
    _post(devices[0], [_point(shas["1.2.3"], "1.2.3", minute=_minute(-3), count=300, escalations=100, errors=5, degraded=10, p95=2.0),
                       _point(shas["1.2.3"], "1.2.3", minute=_minute(-2), count=100, escalations=31, errors=2, degraded=0, p95=6.0)])
    _post(devices[1], [_point(shas["1.2.3"], "1.2.3", minute=_minute(-2), count=300, escalations=100, errors=0, degraded=10, p95=4.0)])
    since = _minute(-10)
    r = admin.get("/v1/models/digits/versions/1.2.3/stats", params={"since": since, "bucket_s": 60})
    assert r.status_code == 200, r.text
    body = r.json()
    t = body["totals"]
    assert t["requests"] == 700 and t["escalations"] == 231 and t["escalation_rate"] == pytest.approx(0.33)
    assert t["degraded"] == 20 and t["errors"] == 7 and t["error_rate"] == pytest.approx(7 / 700)
    assert t["latency_ms"]["p95"] == pytest.approx((300 * 2.0 + 100 * 6.0 + 300 * 4.0) / 700)
    assert t["latency_ms"]["max"] == pytest.approx(12.0)
    assert t["confidence_hist"][9] == 700
    assert t["drift"]["statistic"] == "psi" and t["drift"]["threshold"] == 0.2 and t["drift"]["value"] is None  # no earlier version
    assert [b["requests"] for b in body["buckets"]] == [300, 400]
    assert body["profiles"]["raspberry-pi-5"]["requests"] == 700
    # 1.3.0 has no telemetry; drift of 1.3.0 against 1.2.3 needs some
    assert admin.get("/v1/models/digits/versions/1.3.0/stats", params={"since": since}).json()["totals"]["requests"] == 0
    side = admin.get("/v1/models/digits/stats", params={"since": since}).json()
    assert [(v["version"], v["requests"]) for v in side["versions"]] == [("1.2.3", 700), ("1.3.0", 0)]
    # /metrics: per-version gauges of the last 15 minutes, labelled by model and version only
    metrics = live_server.client().get("/metrics").text
    assert 'edgekit_field_requests{model="digits",version="1.2.3"} 700.0' in metrics
    assert 'edgekit_field_escalation_rate{model="digits",version="1.2.3"} 0.33' in metrics
    assert all(line.split("{")[1].startswith('model="digits",version="') for line in metrics.splitlines() if line.startswith("edgekit_field_"))
    # bad filters: 404 for what does not exist, 400 with a reason for ranges and buckets
    for path, params, status, code in [
        ("/v1/models/digits/versions/9.9.9/stats", {}, 404, "not_found"),
        ("/v1/models/nope/versions/1.2.3/stats", {}, 404, "not_found"),
        ("/v1/models/digits/versions/1.2.3/stats", {"profile": "pixel-8"}, 404, "not_found"),
        ("/v1/models/digits/versions/1.2.3/stats", {"reference_version": "0.0.1"}, 404, "not_found"),
        ("/v1/models/digits/versions/1.2.3/stats", {"since": _minute(5), "until": _minute(-5)}, 400, "bad_range"),
        ("/v1/models/digits/versions/1.2.3/stats", {"since": "2020-01-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, 400, "range_too_large"),
        ("/v1/models/digits/versions/1.2.3/stats", {"since": _minute(-60 * 24 * 30), "bucket_s": 60}, 400, "too_many_buckets"),
        ("/v1/models/digits/versions/1.2.3/stats", {"bucket_s": 1}, 400, "bucket_too_small"),
        ("/v1/models/digits/versions/1.2.3/stats", {"since": "yesterday"}, 422, "invalid_request"),
    ]:
        r = admin.get(path, params=params)
        assert r.status_code == status, (path, params, r.text)
        assert r.json()["error"]["code"] == code, (path, params, r.text)


@pytest.mark.parametrize("v2_escalation", [20, 11])
def test_a_wave_bakes_and_its_field_gate_compares_against_the_replaced_version(live_server, fleet_bundles, v2_escalation):
    """Two of four devices get 1.3.0; after 200 requests on it the escalation gate decides: 20% vs 10% fails (and the wave
    returns to 1.2.3), 11% vs 10% passes (and the next wave starts)."""
    admin = live_server.admin
    devices, shas = _on_v1(live_server, fleet_bundles, 4)
    r = admin.post("/v1/rollouts", json={"model": "digits", "version": "1.3.0", "waves": [50, 100],
                                         "gates": {"max_escalation_increase": 0.05, "max_error_rate": 0.01, "max_drift": 0.25,
                                                   "bake_s": 0, "bake_requests": 200}})
    assert r.status_code == 201, r.text
    ro = r.json()
    assert ro["gates"] == {"max_failure_rate": 0.0, "require_golden": True, "max_escalation_increase": 0.05, "max_error_rate": 0.01,
                           "max_drift": 0.25, "bake_s": 0.0, "bake_requests": 200.0}
    wave = {d["device_id"] for d in ro["waves"][0]["devices"]}
    for d in devices:
        if d.device_id in wave:
            d.install(d.poll())
    baking = wait_for(lambda: (x := admin.get(f"/v1/rollouts/{ro['id']}").json())["waves"][0]["state"] == "baking" and x)
    assert baking["waves"][0]["bake_started_at"] is not None and baking["state"] == "running"
    hist = [0] * 7 + [10, 30, 60]
    for d in devices:
        if d.device_id in wave:  # the new version: 100 requests each
            _post(d, [_point(shas["1.3.0"], "1.3.0", minute=_minute(), count=100, escalations=v2_escalation, hist=hist)])
        else:  # comparable devices still on 1.2.3, same window
            _post(d, [_point(shas["1.2.3"], "1.2.3", minute=_minute(), count=100, escalations=10, hist=hist)])
    done = wait_for(lambda: (x := admin.get(f"/v1/rollouts/{ro['id']}").json())["waves"][0]["state"] in ("passed", "failed") and x)
    gates = {g["gate"]: g for g in done["waves"][0]["gate_results"]}
    esc = gates["max_escalation_increase"]
    assert esc["value"] == pytest.approx(v2_escalation / 100 - 0.10)
    assert "devices outside the wave" in esc["note"]
    assert gates["max_error_rate"]["passed"] is True and gates["max_drift"]["value"] == pytest.approx(0.0, abs=1e-9)
    if v2_escalation == 20:
        assert esc["passed"] is False and done["state"] == "failed"
        assert "max_escalation_increase" in done["reason"]
        for d in devices:
            if d.device_id in wave:
                p = d.desired()
                assert p["action"] == "revert" and p["artifact"]["sha256"] == shas["1.2.3"] and p["reason"] == "gate_failed"
        assert done["waves"][1]["state"] == "pending"
    else:
        assert esc["passed"] is True
        wait_for(lambda: admin.get(f"/v1/rollouts/{ro['id']}").json()["waves"][1]["state"] in ("running", "baking"))


def test_named_tokens_revocation_audit_decommission_and_the_rollout_list(live_server, fleet_bundles):
    admin = live_server.admin
    r = admin.post("/v1/tokens", json={"name": "ci-pipeline"})
    assert r.status_code == 201, r.text
    ci = r.json()
    assert ci["name"] == "ci-pipeline" and ci["scope"] == "admin" and ci["token"].startswith("ekadm_")
    assert admin.post("/v1/tokens", json={"name": "ci-pipeline"}).status_code == 409
    assert admin.post("/v1/tokens", json={"name": "Bad Name"}).status_code == 422
    ci_client = live_server.client(ci["token"])
    assert upload(ci_client, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"]]).status_code == 201
    assert ci_client.post("/v1/rollouts/ro_nope/pause").status_code == 404
    events = admin.get("/v1/audit", params={"actor": "ci-pipeline"}).json()
    assert events["total"] == 2
    newest, oldest = events["items"]
    assert (newest["action"], newest["target"], newest["status"], newest["result"]) == (
        "POST /v1/rollouts/{rollout_id}/pause", "rollout_id=ro_nope", 404, "not_found")
    assert (oldest["action"], oldest["status"], oldest["result"]) == ("POST /v1/models/{name}/versions", 201, "ok")
    assert newest["remote_addr"] == "127.0.0.1" and newest["at"] and newest["token_id"] == ci["id"]
    listed = admin.get("/v1/tokens").json()["items"]
    assert any(t["name"] == "ci-pipeline" and t["revoked_at"] is None for t in listed)
    assert all("token" not in t and "token_hash" not in t for t in listed)
    # revocation: refused on the very next request
    assert admin.post("/v1/tokens/ci-pipeline/revoke").json()["revoked_at"] is not None
    assert ci_client.get("/v1/models").status_code == 401
    assert admin.post("/v1/tokens/9999999/revoke").status_code == 404
    assert ci["name"] not in {t["name"] for t in admin.get("/v1/tokens").json()["items"]}
    assert admin.get("/v1/audit", params={"action": "revoke"}).json()["items"][0]["actor"] != "ci-pipeline"
    # decommission: the device's token stops working and no rollout targets it again
    a, b = SimDevice(live_server, "pi-old", tags=["dc"]).enroll(), SimDevice(live_server, "pi-new", tags=["dc"]).enroll()
    r = admin.post(f"/v1/devices/{a.device_id}/decommission")
    assert r.status_code == 200 and r.json()["decommissioned_at"]
    assert a.http.get("/v1/device/desired").status_code == 401
    assert admin.get(f"/v1/devices/{a.device_id}").json()["decommissioned_at"] is not None
    ro = admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "selector": {"tags": ["dc"]}, "waves": [100]}).json()
    assert [d["device_id"] for d in ro["waves"][0]["devices"]] == [b.device_id]
    assert admin.post(f"/v1/devices/{b.device_id}/decommission").status_code == 409  # in a running rollout
    # the rollout list: filters and paging
    page = admin.get("/v1/rollouts", params={"state": "running", "model": "digits", "limit": 1}).json()
    assert page["total"] == 1 and page["items"][0]["id"] == ro["id"] and page["items"][0]["waves"][0]["state"] == "running"
    assert admin.get("/v1/rollouts", params={"state": "completed"}).json()["total"] == 0
    assert admin.get("/v1/rollouts", params={"offset": 1}).json()["items"] == []
    assert admin.get("/v1/rollouts", params={"state": "bogus"}).status_code == 422
    assert admin.get("/v1/rollouts", params={"limit": 0}).status_code == 422
