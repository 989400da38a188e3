"""``edgekit agent run`` as a real process against a scripted fleet server over real HTTP on loopback."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import numpy as np
import pytest

from agent_support import wait_for
from device_agents.slots import Slots
from device_agents.store import DataDir
from device_agents.telemetry import Recorder, TelemetryBuffer
from edgekit.runtime import load_active, read_active_pointer
from scripted_server import ScriptedServer

pytestmark = pytest.mark.timeout(240)


@pytest.fixture()
def server():
    s = ScriptedServer().start()
    yield s
    s.stop()


def record(data: Path) -> dict:
    return json.loads((data / "state.json").read_text())


def converged(server: ScriptedServer, data: Path, serial: int, phase: str = "activated"):
    def check():
        phases = [p for p, _ in server.phases(serial)]
        return phase in phases and (data / "state.json").exists() and record(data)["state"] == "idle"
    return check


def assert_one_verified_model(data: Path, expected: set[str]) -> str:
    """Exactly one model is active, it is one of ``expected``, and its bytes verify."""
    ptr = read_active_pointer(data)
    assert ptr is not None and ptr.sha256 in expected, f"active {ptr and ptr.sha256[:12]}, expected one of {[e[:12] for e in expected]}"
    Slots(DataDir(data)).verify(ptr.sha256)
    return ptr.sha256


def test_enroll_install_upgrade_revert_and_clean_stop(bundles, server, spawn_agent, tmp_path: Path) -> None:
    data = tmp_path / "dev"
    a = server.add_bundle(bundles["pi"], tmp_path / "ekb")
    b = server.add_bundle(bundles["pi_b"], tmp_path / "ekb")
    server.assign(server.payload(a))
    proc = spawn_agent(server.url, data)
    wait_for(converged(server, data, 1), 60, "version A active")
    assert [p for p, _ in server.phases(1)] == ["downloaded", "verified", "profiled", "activated"]
    ident = data / "identity.json"
    assert stat.S_IMODE(ident.stat().st_mode) == 0o600 and json.loads(ident.read_text())["server_public_key"] == server.public_key
    assert_one_verified_model(data, {a["sha256"]})

    server.assign(server.payload(b))
    wait_for(converged(server, data, 2), 60, "version B active")
    profiled = next(r for r in server.reports if r["serial"] == 2 and r["phase"] == "profiled")["metrics"]
    assert profiled["baseline"]["sha256"] == a["sha256"] and profiled["baseline"]["p95_ms"] > 0
    assert {"load_ms", "warmup_runs", "runs", "p50_ms", "p95_ms", "p99_ms", "peak_rss_mb", "golden_top1_agreement",
            "golden_max_abs_err", "golden_passed", "runtime", "delegate"} <= set(profiled)
    assert_one_verified_model(data, {b["sha256"]})

    server.assign(server.payload(a, action="revert"))
    wait_for(converged(server, data, 3, "rolled_back"), 60, "revert")
    assert server.phases(3) == [("rolled_back", "server_rollback")]
    assert_one_verified_model(data, {a["sha256"]})
    assert Slots(DataDir(data)).info(b["sha256"])["blocked"] == "reverted"
    enrolls = [r for r in server.requests if r[1] == "/v1/devices/enroll"]
    assert len(enrolls) == 1

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    # restarted with no enroll token: the pinned identity is used, nothing is re-done
    proc = spawn_agent(server.url, data, token=None)
    wait_for(lambda: sum(1 for r in server.requests if r[1] == "/v1/device/desired") > 8, 30, "polls after restart")
    assert len([r for r in server.requests if r[1] == "/v1/devices/enroll"]) == 1 and len(server.phases(3)) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def test_every_bad_assignment_is_refused_with_its_own_reason(bundles, server, spawn_agent, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = tmp_path / "dev"
    a = server.add_bundle(bundles["pi"], tmp_path / "ekb")
    first = server.assign(server.payload(a))
    spawn_agent(server.url, data)
    wait_for(converged(server, data, 1), 60, "version A active")

    def corrupted() -> dict:
        art = server.add_bundle(bundles["pi_b"], tmp_path / "ekb")
        raw = bytearray(server.artifacts[art["sha256"]])
        raw[len(raw) // 2] ^= 0xFF
        server.artifacts[art["sha256"]] = bytes(raw)
        return server.payload(art)

    def truncated() -> dict:
        art = server.add_bundle(bundles["pi_b"], tmp_path / "ekb2")
        server.artifacts[art["sha256"]] = server.artifacts[art["sha256"]][: art["size_bytes"] // 2]
        return server.payload(art)

    cases = [
        ("sha256_mismatch", lambda: server.assign(corrupted())),
        ("download_failed", lambda: server.assign(truncated())),
        ("bad_signature", lambda: server.assign(server.payload(server.add_bundle(bundles["pi_b"], tmp_path / "e3")), Ed25519PrivateKey.generate())),
        ("expired", lambda: server.assign(server.payload(server.add_bundle(bundles["pi_b"], tmp_path / "e4"), expires_in_s=-5))),
        ("wrong_profile", lambda: server.assign(server.payload(server.add_bundle(bundles["coral"], tmp_path / "e5")))),
        ("golden_mismatch", lambda: server.assign(server.payload(server.add_bundle(bundles["pi_bad_golden"], tmp_path / "e6")))),
    ]
    reasons = []
    for reason, make in cases:
        serial = json.loads(make()["payload"])["serial"]
        wait_for(converged(server, data, serial, "failed"), 60, reason)
        got = dict(server.phases(serial))["failed"]
        reasons.append(got)
        assert got == reason
        assert_one_verified_model(data, {a["sha256"]})
        assert "activated" not in dict(server.phases(serial))
    # the replay: the first assignment, signed by the real key, served again after newer ones were accepted
    with server._lock:
        server.assignment = first
    wait_for(lambda: ("failed", "replayed_serial") in server.phases(1), 60, "replay refused")
    reasons.append("replayed_serial")
    assert len(set(reasons)) == len(reasons) == 7
    assert_one_verified_model(data, {a["sha256"]})
    assert record(data)["last_serial"] == server.serial  # the golden-mismatch assignment passed acceptance; the replay did not move it


def test_sigterm_mid_download_resumes_with_range(bundles, server, spawn_agent, tmp_path: Path) -> None:
    data = tmp_path / "dev"
    a = server.add_bundle(bundles["pi"], tmp_path / "ekb")
    server.throttle_s = 0.25  # 4 KiB/s: the download takes seconds
    server.assign(server.payload(a))
    proc = spawn_agent(server.url, data)
    part = data / "models" / f"{a['sha256']}.part"
    wait_for(lambda: part.exists() and part.stat().st_size >= 2048, 60, "a partial download")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert record(data)["state"] == "downloading"
    have = part.stat().st_size
    assert 0 < have < a["size_bytes"]
    server.throttle_s = 0.0
    spawn_agent(server.url, data, token=None)
    wait_for(converged(server, data, 1), 60, "resumed download activated")
    ranges = [h.get("Range") for m, path, h in server.requests if m == "GET" and path.startswith("/v1/artifacts/")]
    assert ranges[0] is None and f"bytes={have}-" in ranges
    assert_one_verified_model(data, {a["sha256"]})


def test_server_down_keeps_serving_backs_off_buffers_and_flushes(bundles, server, spawn_agent, tmp_path: Path) -> None:
    data = tmp_path / "dev"
    a = server.add_bundle(bundles["pi"], tmp_path / "ekb")
    server.assign(server.payload(a))
    proc = spawn_agent(server.url, data)
    wait_for(converged(server, data, 1), 60, "version A active")
    server.stop()
    model = load_active(data)
    x = np.load(bundles["pi"] / "golden.npz")["x"]
    rec = Recorder(data, background=False, capacity=6)
    t0 = 1_790_000_000
    for minute in range(8):  # 8 minutes of traffic while the server is down; the buffer holds 6
        for i in range(5):
            y = model.predict(x[i:i + 1])
            rec.record(latency_ms=1.0 + i, confidence=float(y.max()), source="device", error=None, escalated=False, degraded=False,
                       at=t0 + 60 * minute + i)
    rec.flush(include_current=True)
    assert TelemetryBuffer(data).fill()[0] == 6
    log = data.with_name(data.name + ".log")
    wait_for(lambda: log.read_text().count("server unreachable") >= 4, 30, "backoff while down")
    assert proc.poll() is None and read_active_pointer(data).sha256 == a["sha256"]
    server.start()  # same port
    wait_for(lambda: TelemetryBuffer(data).fill() == (0, 10_000, 0), 60, "telemetry flushed")
    points = [p for batch in server.telemetry for p in batch["points"]]
    assert sum(p["count"] for p in points) == 30 and len(points) == 6
    assert sum(batch["dropped"] for batch in server.telemetry) == 2
    assert all(p["model_sha256"] == a["sha256"] and p["model_version"] == "1.2.3" for p in points)
    assert os.environ.get("EDGEKIT_AGENT_TELEMETRY_CAPACITY") is None
