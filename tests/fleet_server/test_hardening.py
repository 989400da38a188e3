"""Regression tests for defects found in review: each was a 500, a lost artifact, a wedged engine or a
leak, on SQLite and PostgreSQL (``live_server`` runs every test on both)."""

from __future__ import annotations

import hashlib
import socket
import threading

from fleet_support import SimDevice, pack_raw, upload, wait_for

PI = "raspberry-pi-5"


def _ctx(server):  # noqa: ANN001, ANN202 - the AppContext of a LiveServer running in this process
    return server._server.config.app.state.ctx


def _error(r, status: int, code: str) -> dict:  # noqa: ANN001
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    return err


# -- 2: a failed upload never deletes the artifact of a concurrent successful one --------------------------------------------


def test_the_same_bytes_under_another_version_are_refused_and_leave_no_file(live_server, fleet_bundles):
    """Version truth makes the old race (the same bytes committed under two versions while one upload undoes) impossible:
    bytes carry their manifest's version, so a second version of the same bytes is refused before anything is written.

    A (no 'version' field: the manifest's r{i}, which exists with other bytes) fails with 409 only at commit time and
    removes the file it wrote; B (the same bytes as version s{i}) is 400 version_mismatch. Several rounds, new bytes each.
    """
    admin = live_server.admin
    arts = live_server.data_dir / "artifacts"
    for i in range(3):
        assert upload(admin, "digits", [fleet_bundles.make(f"pre{i}", version=f"r{i}")]).status_code == 201
        before = sorted(p.name for p in arts.rglob("*") if p.is_file())
        ekb = fleet_bundles.make(f"race{i}", version=f"r{i}")  # other bytes than pre{i} (its own signing key)
        sha = hashlib.sha256(ekb.read_bytes()).hexdigest()
        out: dict[str, int] = {}
        a = threading.Thread(target=lambda: out.__setitem__("A", upload(admin, "digits", [ekb]).status_code))
        b = threading.Thread(target=lambda: out.__setitem__("B", upload(admin, "digits", [ekb], version=f"s{i}").status_code))
        a.start()
        b.start()
        a.join()
        b.join()
        assert out == {"A": 409, "B": 400}, out
        assert sorted(p.name for p in arts.rglob("*") if p.is_file()) == before
        assert admin.get(f"/v1/artifacts/{sha}").status_code == 404
        assert admin.get(f"/v1/models/digits/versions/s{i}").status_code == 404


def test_failed_upload_leaves_no_file_and_restart_sweeps_orphans(live_server, fleet_bundles):
    admin = live_server.admin
    assert upload(admin, "digits", [fleet_bundles.ekb["v1"][PI]]).status_code == 201
    arts = live_server.data_dir / "artifacts"
    before = sorted(p.name for p in arts.rglob("*") if p.is_file())
    # a version conflict found only at commit time: the file it wrote is removed again
    other = fleet_bundles.make("conflict", version="1.2.3")
    _error(upload(admin, "digits", [other]), 409, "conflict")
    assert sorted(p.name for p in arts.rglob("*") if p.is_file()) == before
    # a file no row references (a crash between the file write and the commit) is removed at the next start
    orphan = hashlib.sha256(b"orphan").hexdigest()
    (arts / orphan[:2]).mkdir(exist_ok=True)
    (arts / orphan[:2] / orphan).write_bytes(b"orphan")
    live_server.restart()
    assert sorted(p.name for p in arts.rglob("*") if p.is_file()) == before
    assert live_server.admin.get(f"/v1/artifacts/{before[0]}").status_code == 200


# -- 3, 4: malformed device and admin input is 4xx, never a 500 --------------------------------------------------------------


def test_out_of_range_numbers_and_dates_are_422(live_server, fleet_bundles):
    d = SimDevice(live_server, "pi-big").enroll()
    post = d.http.post
    assert post("/v1/device/reports", json={"serial": 2**70, "phase": "downloaded"}).status_code == 422
    assert post("/v1/device/telemetry", json={"points": [], "dropped": 2**70}).status_code == 422
    for minute in ("9999-12-31T23:59:00-05:00", "0001-01-01T00:00:00+05:00"):
        r = post("/v1/device/telemetry", json={"points": [{"minute": minute, "count": 1}]})
        assert r.status_code == 422, (minute, r.text)
    assert post("/v1/device/telemetry", json={"points": [{"minute": "2026-11-23T10:00:00Z", "count": 2**70}]}).status_code == 422
    assert post("/v1/device/telemetry", json={"points": [], "dropped": 2**31}).status_code == 422  # an INTEGER column
    assert post("/v1/device/telemetry", json={"points": [{"minute": "2026-11-23T10:00:00Z", "count": 2**63 - 1}], "dropped": 2**31 - 1}).status_code == 202
    assert post("/v1/device/reports", json={"serial": 2**31, "phase": "downloaded"}).status_code == 422  # an INTEGER column
    assert post("/v1/device/reports", json={"serial": 2**31 - 1, "phase": "downloaded"}).status_code == 403  # in range, not its own


def test_nul_characters_and_non_finite_numbers_are_refused_or_sanitised(live_server, fleet_bundles):
    admin, enroll = live_server.admin, live_server.client(live_server.enroll_token)
    assert upload(admin, "digits", [fleet_bundles.ekb["v1"][PI]]).status_code == 201
    for body in ({"name": "nul1", "profile": PI, "facts": {"k": "a\x00b"}}, {"name": "nul2", "profile": PI, "facts": {"a\x00": 1}},
                 {"name": "nul3", "profile": PI, "tags": ["a\x00"]}, {"name": "nul\x004", "profile": PI},
                 {"name": "nul5", "profile": "raspberry\x00"}):
        assert enroll.post("/v1/devices/enroll", json=body).status_code == 422, body
    # NaN in free-form facts is kept as null (PostgreSQL's JSON refuses NaN)
    r = enroll.post("/v1/devices/enroll", content='{"name": "nanfacts", "profile": "raspberry-pi-5", "facts": {"temp": NaN, "ok": 1}}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 201, r.text
    assert admin.get(f"/v1/devices/{r.json()['device_id']}").json()["facts"] == {"temp": None, "ok": 1}

    d = SimDevice(live_server, "pi-nul", tags=["nul"]).enroll()
    point = {"minute": "2026-11-23T10:00:00Z", "count": 1, "model_version": "a\x00b"}
    assert d.http.post("/v1/device/telemetry", json={"points": [point]}).status_code == 422
    assert d.http.post("/v1/device/telemetry", json={"points": [dict(point, model_version="1", sources={"\x00": 1})]}).status_code == 422
    assert admin.post("/v1/rollouts", json={"model": "digits\x00", "version": "1.2.3"}).status_code == 422
    r = admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "selector": {"tags": ["nul"]}, "waves": [100]})
    assert r.status_code == 201, r.text
    serial = d.desired()["serial"]
    assert d.report(serial, "failed", reason="other:a\x00b").status_code == 422
    assert d.report(serial, "downloaded", metrics={"m": "\x00"}).status_code == 422
    assert d.report(serial, "downloaded", metrics={"m": "fine"}).status_code == 200
    # gates must be finite positive numbers (1e309 parses as Infinity)
    for gates in ('{"max_p95_ratio": 1e309}', '{"max_peak_rss_mb": NaN}', '{"max_p95_ratio": 0}', '{"max_peak_rss_mb": -1}'):
        r = admin.post("/v1/rollouts", content='{"model": "digits", "version": "1.2.3", "waves": [100], "gates": ' + gates + "}",
                       headers={"content-type": "application/json"})
        _error(r, 422, "invalid_request")


def test_nul_characters_in_urls_are_422(live_server):
    admin = live_server.admin
    for path, params in [("/v1/devices", {"profile": "\x00"}), ("/v1/devices", {"tag": "a\x00"}), ("/v1/telemetry", {"device_id": "\x00"}),
                         ("/v1/telemetry", {"model": "\x00"})]:
        _error(admin.get(path, params=params), 422, "invalid_request")
    for path in ("/v1/devices/a%00b", "/v1/rollouts/a%00b", "/v1/models/digits/versions/a%00b", "/v1/artifacts/%00"):
        _error(admin.get(path), 404, "not_found")
    for since in ("0001-01-01T00:00:00+05:00", "9999-12-31T23:59:00-05:00"):
        assert admin.get("/v1/telemetry", params={"since": since}).status_code in (200, 422), since
    assert admin.get("/v1/devices", params={"profile": "raspberry-pi-5"}).status_code == 200


def test_profiled_metrics_must_not_be_negative(live_server, fleet_bundles):
    assert upload(live_server.admin, "digits", [fleet_bundles.ekb["v1"][PI]]).status_code == 201
    d = SimDevice(live_server, "pi-neg").enroll()
    assert live_server.admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "waves": [100]}).status_code == 201
    serial = d.desired()["serial"]
    for metrics in ({"load_ms": -5}, {"golden_max_abs_err": -1}, {"runs": -3}, {"warmup_runs": -1}, {"runs": 2**70}):
        assert d.report(serial, "profiled", metrics=metrics).status_code == 422, metrics
    assert d.report(serial, "profiled", metrics={"load_ms": 0, "golden_max_abs_err": 0, "runs": 0, "warmup_runs": 0}).status_code == 200


def test_bundle_with_a_directory_for_a_file_is_400(live_server, fleet_bundles):
    ekb = fleet_bundles.make("sigdir", version="4.0.0")
    bundle_dir = fleet_bundles.root / "variants" / "sigdir" / f"digits-{PI}-tflite"
    (bundle_dir / "signature.json").unlink()
    (bundle_dir / "signature.json").mkdir()
    (bundle_dir / "signature.json" / "x").write_text("y")
    pack_raw(bundle_dir, ekb)
    err = _error(upload(live_server.admin, "digits", [ekb]), 400, "bad_bundle")
    assert str(live_server.data_dir) not in err["message"]
    assert live_server.admin.get("/v1/models").json() == []


# -- 4: a non-finite gate value fails the gate; one bad rollout never blocks the engine ----------------------------------------


def test_overflowing_p95_ratio_fails_the_gate_and_the_rollout_stays_usable(live_server, fleet_bundles):
    admin = live_server.admin
    assert upload(admin, "digits", [fleet_bundles.ekb["v1"][PI]]).status_code == 201
    bad = SimDevice(live_server, "pi-inf", tags=["inf"]).enroll()
    good = SimDevice(live_server, "pi-ok", tags=["ok"]).enroll()
    r = admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "selector": {"tags": ["inf"]}, "waves": [100],
                                         "gates": {"max_p95_ratio": 2.0}})
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    bad.install(bad.desired(), p95_ms=1e308, baseline_p95=1e-308)  # 1e308 / 1e-308 overflows to inf
    ro = wait_for(lambda: (x := admin.get(f"/v1/rollouts/{rid}").json())["state"] != "running" and x)
    assert ro["state"] == "failed", ro
    gate = next(g for g in ro["waves"][0]["gate_results"] if g["gate"] == "max_p95_ratio")
    assert gate["value"] is None and gate["passed"] is False
    assert "not a finite number" in ro["reason"]
    _error(admin.post(f"/v1/rollouts/{rid}/pause"), 409, "conflict")
    # the engine still moves other rollouts
    r = admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "selector": {"tags": ["ok"]}, "waves": [100]})
    assert r.status_code == 201, r.text
    good.install(good.desired())
    wait_for(lambda: admin.get(f"/v1/rollouts/{r.json()['id']}").json()["state"] == "completed")


def test_one_failing_rollout_step_never_stops_the_others(live_server, fleet_bundles, monkeypatch, caplog):
    from fleet_server.services import engine

    admin = live_server.admin
    assert upload(admin, "digits", [fleet_bundles.ekb["v1"][PI]]).status_code == 201
    ids = []
    for i in range(3):
        SimDevice(live_server, f"pi-iso{i}", tags=[f"iso{i}"]).enroll()
        r = admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "selector": {"tags": [f"iso{i}"]}, "waves": [100]})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    stepped: list[str] = []
    me = threading.get_ident()

    def evaluate(ctx, rollout_id):  # noqa: ANN001, ANN202 - the first rollout of this pass blows up
        if threading.get_ident() != me:  # the live server's own engine thread may tick meanwhile: not this pass
            return
        stepped.append(rollout_id)
        if len(stepped) == 1:
            raise RuntimeError("boom")

    monkeypatch.setattr(engine, "evaluate", evaluate)
    engine.step_all(_ctx(live_server))  # must not raise
    assert sorted(stepped) == sorted(ids)
    assert any("boom" in (r.exc_text or "") or r.exc_info for r in caplog.records)


# -- 5: a 500 never puts exception details on the wire -----------------------------------------------------------------------


def test_internal_error_answers_a_fixed_message_with_a_request_id(live_server, monkeypatch):
    from fleet_server.services import registry

    def broken(session):  # noqa: ANN001, ANN202
        raise RuntimeError("secret detail /var/lib/edgekit password=hunter2")

    monkeypatch.setattr(registry, "list_models", broken)
    r = live_server.admin.get("/v1/models")
    err = _error(r, 500, "internal_error")
    assert "secret" not in r.text and "RuntimeError" not in r.text and "hunter2" not in r.text
    rid = r.headers["x-request-id"]
    assert rid and rid in err["message"]


# -- 6: /metrics labels are bounded ------------------------------------------------------------------------------------------


def test_metrics_labels_are_route_templates_and_known_methods(live_server):
    host, port = "127.0.0.1", live_server.port
    for method in ("XFOOBAR1", "XFOOBAR2", "PROPFIND"):
        with socket.create_connection((host, port)) as s:
            s.sendall(f"{method} /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            s.recv(1000)
    assert live_server.admin.get("/v1/rollouts/ro_notarealid123").status_code == 404
    assert live_server.admin.get("/no/such/path/xyz").status_code == 404
    text = live_server.client().get("/metrics").text
    assert "XFOOBAR" not in text and "PROPFIND" not in text
    assert 'method="other",route="/healthz"' in text
    assert 'route="/v1/rollouts/{rollout_id}"' in text and "ro_notarealid123" not in text
    assert "/no/such/path" not in text and 'route="unmatched"' in text


# -- 9: upload validation is bounded in time ---------------------------------------------------------------------------------


def test_upload_validation_past_its_time_limit_is_400_and_changes_nothing(start_fleet_server, fleet_bundles):
    server = start_fleet_server(upload_validation_timeout_s=0.001)  # validating a real bundle takes far longer than 1 ms
    err = _error(upload(server.admin, "digits", [fleet_bundles.ekb["v1"][PI]]), 400, "validation_timeout")
    assert "EDGEKIT_UPLOAD_VALIDATION_TIMEOUT_S" in err["hint"]
    assert server.admin.get("/v1/models").json() == []
    staging = server.data_dir / "staging"
    wait_for(lambda: not staging.exists() or not any(staging.iterdir()))  # the abandoned check removes its work dir when it ends
    assert not [p for p in (server.data_dir / "artifacts").rglob("*") if p.is_file()]


# -- a damaged stored artifact is refused, not sent with a Content-Length it cannot fill --------------------------------------


def test_truncated_stored_artifact_is_refused_with_artifact_damaged(live_server, fleet_bundles, caplog):
    admin = live_server.admin
    r = upload(admin, "digits", [fleet_bundles.ekb["v1"][PI]])
    assert r.status_code == 201, r.text
    sha = r.json()["artifacts"][0]["sha256"]
    stored = live_server.data_dir / "artifacts" / sha[:2] / sha
    stored.write_bytes(stored.read_bytes()[: stored.stat().st_size // 2])
    for headers in ({}, {"Range": "bytes=10-"}):
        err = _error(admin.get(f"/v1/artifacts/{sha}", headers=headers), 410, "artifact_damaged")
        assert sha in err["message"]
    assert any("ARTIFACT DAMAGED" in rec.getMessage() for rec in caplog.records)
