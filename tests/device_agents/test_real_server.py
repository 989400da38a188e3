"""The agent against the real fleet server (``edgekit server start`` as a process, SQLite).

Faults are injected where they happen in the field: the server's stored artifact gets a flipped
byte or is cut short, and the agent process is SIGKILLed at random moments during rollouts.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent_support import wait_for
from device_agents.slots import Slots
from device_agents.store import DataDir
from device_agents.telemetry import Recorder, TelemetryBuffer
from edgekit.runtime import load_active, read_active_pointer
from fleet_support import upload

pytestmark = pytest.mark.timeout(280)
TARGETS = ("downloading", "verifying", "profiling", "activating")


@pytest.fixture
def fleet_db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


def _rollout(admin: httpx.Client, version: str, **gates) -> str:
    r = admin.post("/v1/rollouts", json={"model": "digits", "version": version, "selector": {"profiles": ["raspberry-pi-5"]},
                                         "waves": [100], "gates": gates, "wave_timeout_s": 120})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _done(admin: httpx.Client, rid: str) -> dict | None:
    r = admin.get(f"/v1/rollouts/{rid}").json()
    return r if r["state"] in ("completed", "failed", "rolled_back") else None


def _state(data: Path) -> str | None:
    try:
        return json.loads((data / "state.json").read_text())["state"]
    except (FileNotFoundError, ValueError):
        return None


def _stored(server, sha: str) -> Path:
    path = next(server.data_dir.rglob(sha))
    assert path.is_file()
    return path


def test_corrupted_and_truncated_artifacts_on_the_server_are_refused(start_fleet_server, fleet_bundles, spawn_agent,
                                                                   tmp_path: Path) -> None:
    server = start_fleet_server(process=True)
    admin = server.admin
    versions = {}
    for v, ekb in (("1.2.3", fleet_bundles.ekb["v1"]["raspberry-pi-5"]), ("1.3.0", fleet_bundles.ekb["v2"]["raspberry-pi-5"]),
                   ("1.4.0", fleet_bundles.make("v140", version="1.4.0"))):
        r = upload(admin, "digits", [ekb])
        assert r.status_code == 201, r.text
        versions[v] = r.json()["artifacts"][0]["sha256"]
    data = tmp_path / "dev"
    spawn_agent(server.url, data, token=server.enroll_token, extra_env={"EDGEKIT_AGENT_MAX_DOWNLOAD_STALLS": "3"})
    wait_for(lambda: admin.get("/v1/devices").json(), 60, "enrolled")
    rid = _rollout(admin, "1.2.3")
    assert wait_for(lambda: _done(admin, rid), 90, "1.2.3")["state"] == "completed"

    stored = _stored(server, versions["1.3.0"])
    raw = bytearray(stored.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    stored.write_bytes(bytes(raw))
    rid = _rollout(admin, "1.3.0", max_failure_rate=0.0)
    r = wait_for(lambda: _done(admin, rid), 90, "corrupted rollout")
    dev = r["waves"][0]["devices"][0]
    assert r["state"] == "failed" and dev["reason"] == "sha256_mismatch", json.dumps(r)[:2000]

    stored = _stored(server, versions["1.4.0"])
    stored.write_bytes(stored.read_bytes()[: stored.stat().st_size // 2])
    rid = _rollout(admin, "1.4.0", max_failure_rate=0.0)
    r = wait_for(lambda: _done(admin, rid), 120, "truncated rollout")
    dev = r["waves"][0]["devices"][0]
    assert r["state"] == "failed" and dev["reason"] == "download_failed", json.dumps(r)[:2000]

    ptr = read_active_pointer(data)
    assert ptr.sha256 == versions["1.2.3"]
    Slots(DataDir(data)).verify(ptr.sha256)
    assert not Slots(DataDir(data)).has(versions["1.3.0"]) and not Slots(DataDir(data)).has(versions["1.4.0"])


def test_sigkill_during_real_rollouts(start_fleet_server, fleet_bundles, spawn_agent, tmp_path: Path) -> None:
    rng = random.Random(int(time.time()))
    server = start_fleet_server(process=True)
    admin = server.admin
    shas = {}
    for v, ekb in (("1.2.3", fleet_bundles.ekb["v1"]["raspberry-pi-5"]), ("1.3.0", fleet_bundles.ekb["v2"]["raspberry-pi-5"])):
        r = upload(admin, "digits", [ekb])
        assert r.status_code == 201, r.text
        shas[v] = r.json()["artifacts"][0]["sha256"]
    data = tmp_path / "dev"
    proc = spawn_agent(server.url, data, token=server.enroll_token)
    wait_for(lambda: admin.get("/v1/devices").json(), 60, "enrolled")
    current = None
    hit: dict[str, int] = {}
    for round_no in range(40):
        if sum(hit.get(t, 0) for t in TARGETS) >= 10 and sum(1 for t in TARGETS if hit.get(t)) >= 2:
            break
        version = ("1.2.3", "1.3.0")[round_no % 2]
        rid = _rollout(admin, version)
        target = TARGETS[round_no % len(TARGETS)]
        deadline = time.monotonic() + 30
        while _state(data) != target and time.monotonic() < deadline and not _done(admin, rid):
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))
        proc.kill()
        proc.wait()
        at = _state(data) or "none"
        hit[at] = hit.get(at, 0) + 1
        ptr = read_active_pointer(data)
        if current is None:
            assert ptr is None or ptr.sha256 == shas[version], f"kill in {at}"
        else:
            assert ptr is not None and ptr.sha256 in {current, shas[version]}, f"kill in {at}"
        if ptr is not None:
            Slots(DataDir(data)).verify(ptr.sha256)
        proc = spawn_agent(server.url, data, token=None)
        r = wait_for(lambda: _done(admin, rid), 90, f"rollout {version} after a kill in {at}")
        assert r["state"] == "completed", json.dumps(r)[:2000]
        wait_for(lambda: _state(data) == "idle", 30, "agent idle")
        ptr = read_active_pointer(data)
        assert ptr.sha256 == shas[version]
        Slots(DataDir(data)).verify(ptr.sha256)
        current = ptr.sha256
    print(f"kills by state: {hit}")
    # A real download and verification of a small artifact on loopback are too quick to be hit every time
    # (a run that hit only profiling and activating happened on a loaded box); the scripted-server test
    # (test_kill.py) throttles the download and requires all four states.
    assert sum(hit.get(t, 0) for t in TARGETS) >= 10 and sum(1 for t in TARGETS if hit.get(t)) >= 2, hit


def test_real_server_down_then_back_gets_every_buffered_point(start_fleet_server, fleet_bundles, spawn_agent, tmp_path: Path) -> None:
    server = start_fleet_server(process=True)
    admin = server.admin
    r = upload(admin, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"]])
    assert r.status_code == 201, r.text
    sha = r.json()["artifacts"][0]["sha256"]
    data = tmp_path / "dev"
    spawn_agent(server.url, data, token=server.enroll_token)
    wait_for(lambda: admin.get("/v1/devices").json(), 60, "enrolled")
    rid = _rollout(admin, "1.2.3")
    assert wait_for(lambda: _done(admin, rid), 90, "1.2.3")["state"] == "completed"
    device_id = admin.get("/v1/devices").json()[0]["id"]

    server.stop()
    model = load_active(data)  # the app keeps answering from the active model
    rec = Recorder(data, background=False)
    t0 = int(time.time() // 60 * 60) - 3600  # an hour ago, one point per minute
    x = np.load(fleet_bundles.dirs["v1"]["raspberry-pi-5"] / "golden.npz")["x"]
    for minute in range(20):
        y = model.predict(x[minute % len(x)][None])
        rec.record(latency_ms=1.0, confidence=float(y.max()), source="device", error=None, escalated=False, degraded=False,
                   at=t0 + 60 * minute)
    rec.close()
    assert TelemetryBuffer(data).fill()[0] == 20
    log = data.with_name(data.name + ".log")
    wait_for(lambda: log.read_text().count("server unreachable") >= 3, 30, "the agent backing off")
    server.start()  # same port, database and data dir
    admin = server.admin  # stop() closed the old clients
    wait_for(lambda: TelemetryBuffer(data).fill()[0] == 0, 60, "buffer flushed")
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0 - 60))
    points = admin.get("/v1/telemetry", params={"device_id": device_id, "since": since}).json()["points"]
    assert len(points) == 20 and sum(p["count"] for p in points) == 20
    assert {p["model_sha256"] for p in points} == {sha}
