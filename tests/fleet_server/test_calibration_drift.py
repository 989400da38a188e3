"""Drift against calibration: when a version's manifest carries the confidence histogram its router was calibrated
on, the fleet server's PSI (stats and the ``max_drift`` field gate) uses it as the reference, and says so; without
one it falls back to the previous version's field histogram. Real server (SQLite and PostgreSQL), devices over HTTP."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from fleet_server.services.field_stats import psi
from fleet_support import SimDevice, rebundle, upload, wait_for

CALIBRATION = [0] * 7 + [10, 30, 60]  # the threshold data: confident
FIELD = [0] * 5 + [20] * 5  # the field: much less confident (both versions alike, so PSI against 1.2.3 would be 0)


def _minute() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(second=0, microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _point(sha: str, version: str, count: int = 100) -> dict:
    return {"minute": _minute(), "model_sha256": sha, "model_version": version, "count": count, "errors": 0, "escalations": 10,
            "degraded": 0, "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0, "max": 4.0}, "confidence_hist": list(FIELD),
            "sources": {"device": count}}


def _with_calibration(m: dict) -> None:
    m["router_policy"] = {
        "method": "max_softmax", "device_output": "probabilities", "temperature": 1.0, "threshold": 0.7,
        "target": {"kind": "escalation_budget", "value": 0.1}, "expected_escalation_rate": 0.1, "cloud_model": "cloud.onnx",
        "cloud_model_sha256": "0" * 64, "data_sha256": "1" * 64, "temperature_samples": 20, "threshold_samples": sum(CALIBRATION),
        "confidence_histogram": {"edges": [i / 10 for i in range(11)], "counts": CALIBRATION}}


def test_drift_uses_the_calibration_histogram_when_the_manifest_has_one(live_server, fleet_bundles, tmp_path: Path) -> None:
    from edgekit.bundle import pack

    admin = live_server.admin
    calibrated = rebundle(fleet_bundles.dirs["v1"]["raspberry-pi-5"], tmp_path / "cal", version="1.3.0", manifest=_with_calibration)
    shas = {}
    for version, ekb in (("1.2.3", fleet_bundles.ekb["v1"]["raspberry-pi-5"]), ("1.3.0", pack(calibrated, tmp_path / "cal.ekb"))):
        r = upload(admin, "digits", [ekb])
        assert r.status_code == 201, r.text
        shas[version] = r.json()["artifacts"][0]["sha256"]
    devices = [SimDevice(live_server, f"pi-{i}").enroll() for i in range(4)]
    ro = admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "waves": [100]}).json()
    for d in devices:
        d.install(d.poll())
    wait_for(lambda: admin.get(f"/v1/rollouts/{ro['id']}").json()["state"] == "completed")

    r = admin.post("/v1/rollouts", json={"model": "digits", "version": "1.3.0", "waves": [50, 100],
                                         "gates": {"max_drift": 0.25, "bake_s": 0, "bake_requests": 200}})
    assert r.status_code == 201, r.text
    ro = r.json()
    wave = {d["device_id"] for d in ro["waves"][0]["devices"]}
    for d in devices:
        if d.device_id in wave:
            d.install(d.poll())
    wait_for(lambda: admin.get(f"/v1/rollouts/{ro['id']}").json()["waves"][0]["state"] == "baking")
    for d in devices:  # the same field histogram on both versions: only the calibration reference shows the drift
        d.http.post("/v1/device/telemetry", json={"points": [_point(shas["1.3.0"], "1.3.0") if d.device_id in wave
                                                             else _point(shas["1.2.3"], "1.2.3")]}).raise_for_status()
    done = wait_for(lambda: (x := admin.get(f"/v1/rollouts/{ro['id']}").json())["waves"][0]["state"] in ("passed", "failed") and x)
    gate = next(g for g in done["waves"][0]["gate_results"] if g["gate"] == "max_drift")
    expected = psi(FIELD, CALIBRATION)
    assert expected > 0.25
    assert gate["value"] == pytest.approx(expected) and gate["passed"] is False, gate
    assert "calibration" in gate["note"] and done["state"] == "failed" and "max_drift" in done["reason"]

    since = ro["created_at"][:16] + ":00Z"
    d2 = admin.get("/v1/models/digits/versions/1.3.0/stats", params={"since": since}).json()["totals"]["drift"]
    assert d2["reference"].startswith("calibration") and d2["value"] == pytest.approx(expected) and d2["drifted"] is True
    # an explicit reference version is honoured: 1.3.0 against 1.2.3's field histogram (the same: no drift)
    d2v = admin.get("/v1/models/digits/versions/1.3.0/stats", params={"since": since, "reference_version": "1.2.3"}).json()["totals"]["drift"]
    assert d2v["reference"].startswith("version 1.2.3") and d2v["value"] == pytest.approx(0.0, abs=1e-9)
    # 1.2.3's manifest has no calibration histogram: the fallback, which says why
    d1 = admin.get("/v1/models/digits/versions/1.2.3/stats", params={"since": since}).json()["totals"]["drift"]
    assert d1["value"] is None and "no calibration histogram" in d1["reference"]
