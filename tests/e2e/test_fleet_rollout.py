"""A fleet server and five agents as real processes: a rollout converges, a regressed one is stopped.

The server is ``edgekit server start`` (SQLite) on a free port; each agent is ``edgekit agent run``
with its own data dir, three raspberry-pi-5 and two coral-edgetpu devices, real LiteRT profiling
on this machine. Version 1.2.3 goes out in waves 20,100 and every device converges on it. Then
2.0.0, the same task through three 1024-wide Dense layers, goes out with max_p95_ratio=1.5: the
first wave's device measures it against the active model in the same session, the gate fails,
that device returns to 1.2.3, and the other four never receive 2.0.0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from device_agents.slots import Slots
from device_agents.store import DataDir
from device_agents.telemetry import Recorder
from edgekit.bundle import pack
from edgekit.runtime import read_active_pointer
from fleet_support import upload, wait_for

pytestmark = pytest.mark.timeout(420)
ROOT = Path(__file__).resolve().parents[2]
PROFILES = ("raspberry-pi-5", "raspberry-pi-5", "raspberry-pi-5", "coral-edgetpu", "coral-edgetpu")
AGENT_ENV = {"EDGEKIT_AGENT_POLL_INTERVAL_S": "0.3", "EDGEKIT_AGENT_PROFILE_RUNS": "50", "EDGEKIT_AGENT_PROFILE_BUDGET_S": "1",
             "EDGEKIT_AGENT_PROFILE_WARMUP": "5", "EDGEKIT_AGENT_BACKOFF_BASE_S": "0.1", "EDGEKIT_AGENT_BACKOFF_MAX_S": "1"}


@pytest.fixture
def fleet_db(tmp_path: Path) -> str:
    """SQLite only: this test is about the agents; the server's own suite covers PostgreSQL."""
    return f"sqlite:///{tmp_path / 'fleet.db'}"


def start_agents(server, tmp_path: Path) -> tuple[list[subprocess.Popen], list[Path]]:
    env = {**os.environ, **AGENT_ENV, "PYTHONPATH": str(ROOT)}
    procs, dirs = [], []
    for i, profile in enumerate(PROFILES):
        data = tmp_path / f"agent{i}"
        log = open(tmp_path / f"agent{i}.log", "wb")
        cmd = [sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())", "agent", "run", "--server", server.url,
               "--enroll-token", server.enroll_token, "--data-dir", str(data), "--profile", profile, "--name", f"dev{i}",
               "--tag", "e2e", "-v"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        dirs.append(data)
    return procs, dirs


def rollout(admin: httpx.Client, version: str, gates: dict) -> str:
    r = admin.post("/v1/rollouts", json={"model": "digits", "version": version, "selector": {"profiles": [], "tags": ["e2e"]},
                                         "waves": [20, 100], "gates": gates, "wave_timeout_s": 180})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def finished(admin: httpx.Client, rid: str) -> dict | None:
    r = admin.get(f"/v1/rollouts/{rid}").json()
    return r if r["state"] in ("completed", "failed", "rolled_back") else None


def test_rollout_converges_and_a_regressed_version_is_stopped_after_its_first_wave(
        start_fleet_server, fleet_bundles, slow_digits_bundles, tmp_path: Path) -> None:
    server = start_fleet_server(process=True)
    admin = server.admin
    v1 = upload(admin, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"], fleet_bundles.ekb["v1"]["coral-edgetpu"]])
    assert v1.status_code == 201, v1.text
    slow = [pack(r.bundle_dir, tmp_path / f"slow-{r.profile}.ekb") for r in slow_digits_bundles.results]
    v2 = upload(admin, "digits", slow)
    assert v2.status_code == 201, v2.text
    sha_v1 = {a["profile"]: a["sha256"] for a in v1.json()["artifacts"]}
    sha_v2 = {a["profile"]: a["sha256"] for a in v2.json()["artifacts"]}

    procs, dirs = start_agents(server, tmp_path)
    try:
        wait_for(lambda: len(admin.get("/v1/devices", params={"tag": "e2e"}).json()) == 5, 60, "five devices enrolled")
        ids = {d["name"]: d["id"] for d in admin.get("/v1/devices").json()}

        # 1.2.3 to everyone, waves 20,100
        rid1 = rollout(admin, "1.2.3", {"max_failure_rate": 0.0})
        r1 = wait_for(lambda: finished(admin, rid1), 240, "rollout 1.2.3 finished")
        assert r1["state"] == "completed", json.dumps(r1, indent=1)[:3000]
        assert [len(w["devices"]) for w in r1["waves"]] == [1, 4]
        for i, data in enumerate(dirs):
            ptr = wait_for(lambda: (p := read_active_pointer(data)) is not None and p.sha256 == sha_v1[PROFILES[i]] and p, 30, f"agent{i} on 1.2.3")
            Slots(DataDir(data)).verify(ptr.sha256)
        devices = admin.get("/v1/devices", params={"tag": "e2e"}).json()
        assert {d["active"]["version"] for d in devices} == {"1.2.3"}
        serial_after_v1 = {i: json.loads((d / "state.json").read_text())["last_serial"] for i, d in enumerate(dirs)}

        # 2.0.0 is ~30x slower per prediction: the first wave's gate fails and the rollout stops there
        rid2 = rollout(admin, "2.0.0", {"max_p95_ratio": 1.5})
        r2 = wait_for(lambda: finished(admin, rid2), 240, "rollout 2.0.0 decided")
        assert r2["state"] == "failed", json.dumps(r2, indent=1)[:3000]
        first = r2["waves"][0]
        assert first["state"] == "failed" and len(first["devices"]) == 1
        gate = next(g for g in first["gate_results"] if g["gate"] == "max_p95_ratio")
        assert not gate["passed"] and gate["value"] > 1.5
        victim = first["devices"][0]["device_id"]
        k = next(i for i in range(5) if ids[f"dev{i}"] == victim)
        profiled = first["devices"][0]["metrics"]
        assert profiled["baseline"]["sha256"] == sha_v1[PROFILES[k]] and profiled["p95_ms"] > 1.5 * profiled["baseline"]["p95_ms"]

        # the first wave's device returns to 1.2.3 and keeps 2.0.0 out of use
        wait_for(lambda: admin.get(f"/v1/devices/{victim}").json()["active"]["version"] == "1.2.3", 60, "victim reverted on the server")
        ptr = wait_for(lambda: (p := read_active_pointer(dirs[k])) is not None and p.sha256 == sha_v1[PROFILES[k]] and p, 30, "victim reverted")
        Slots(DataDir(dirs[k])).verify(ptr.sha256)
        assert Slots(DataDir(dirs[k])).info(sha_v2[PROFILES[k]])["blocked"] == "reverted"
        status = json.loads(subprocess.run([sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())", "agent",
                                            "status", "--data-dir", str(dirs[k]), "--json"], capture_output=True, text=True, cwd=ROOT,
                                           check=True).stdout)
        assert status["active"]["version"] == "1.2.3" and status["last_result"]["action"] == "revert"

        # the rest never received it: no new serial, no slot, still on 1.2.3
        time.sleep(1.0)  # a few poll intervals after the decision
        for i, data in enumerate(dirs):
            if i == k:
                continue
            assert json.loads((data / "state.json").read_text())["last_serial"] == serial_after_v1[i]
            assert not Slots(DataDir(data)).has(sha_v2[PROFILES[i]])
            assert read_active_pointer(data).sha256 == sha_v1[PROFILES[i]]
        assert r2["waves"][1]["state"] == "pending"

        # telemetry recorded by an app on one device reaches the server
        rec = Recorder(dirs[0], background=False)
        for i in range(25):
            rec.record(latency_ms=0.5 + i / 100, confidence=0.95, source="device", error=None, escalated=False, degraded=False)
        rec.close()
        tel = wait_for(lambda: (t := admin.get("/v1/telemetry", params={"device_id": ids["dev0"]}).json())["points"] and t, 30, "telemetry")
        assert sum(p["count"] for p in tel["points"]) == 25 and tel["points"][0]["model_sha256"] == sha_v1[PROFILES[0]]
        for p in procs:  # SIGTERM: every agent stops cleanly
            p.terminate()
        assert [p.wait(timeout=30) for p in procs] == [0] * 5
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
