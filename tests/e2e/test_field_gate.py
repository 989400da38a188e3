"""A version that is fine on its golden set but escalates about twice as often in the field fails its first
wave on the field gate, and the fleet returns to the previous version.

Real processes: ``edgekit server start`` (SQLite) and four ``edgekit agent run`` (raspberry-pi-5, real LiteRT
profiling here). The "field" is an app per device in this process: the real ``HybridClassifier.from_active``
on the agent's data dir (it follows the agent's switches, model and router policy together), no cloud (an
escalated request is answered by the device, degraded), every prediction recorded with
``device_agents.telemetry.Recorder`` into the agent's buffer, which the agent posts. The inputs are the
held-out digits of the router tests. Both versions are calibrated by the real ``calibrate_router`` against
the float cloud model: 1.2.3 (the digits CNN) for an escalation budget of 10%, 2.0.0 (the wide MLP trained
for 3 epochs, whose own golden set passes on the device) for 25%. The test first measures, on the bundles
themselves, that 2.0.0 escalates at least twice as often on the field inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgekit.bundle import pack
from edgekit.runtime import load, read_active_pointer
from fleet_support import upload, wait_for

pytestmark = pytest.mark.timeout(480)
ROOT = Path(__file__).resolve().parents[2]
N_AGENTS = 4
AGENT_ENV = {"EDGEKIT_AGENT_POLL_INTERVAL_S": "0.3", "EDGEKIT_AGENT_PROFILE_RUNS": "30", "EDGEKIT_AGENT_PROFILE_BUDGET_S": "1",
             "EDGEKIT_AGENT_PROFILE_WARMUP": "3", "EDGEKIT_AGENT_BACKOFF_BASE_S": "0.1", "EDGEKIT_AGENT_BACKOFF_MAX_S": "1"}


@pytest.fixture
def fleet_db(tmp_path: Path) -> str:
    """SQLite only: this test is about the agents and the field; the server's suite covers PostgreSQL."""
    return f"sqlite:///{tmp_path / 'fleet.db'}"


def _escalation_rate(bundle: Path, x: np.ndarray) -> float:
    from hybrid_router.policy import EscalationPolicy, decide_batch

    model = load(bundle)
    policy = model.manifest.router_policy
    name = policy.score_output  # the output the router scores (the logits output when the bundle has one)
    raw = model.run({model.inputs[0].name: x})[name] if name else model.predict(x)
    _, _, _, esc = decide_batch(np.asarray(raw, dtype=np.float64), EscalationPolicy.from_router_policy(policy))
    return float(np.mean(esc))


def _hybrid_router_fixtures():
    """tests/hybrid_router/conftest.py as a module: its cached float cloud model and router data splits."""
    import importlib.util

    if str(ROOT / "tests" / "hybrid_router") not in sys.path:
        sys.path.append(str(ROOT / "tests" / "hybrid_router"))  # its router_support module
    spec = importlib.util.spec_from_file_location("hybrid_router_fixtures", ROOT / "tests" / "hybrid_router" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


digits_cloud = _hybrid_router_fixtures().digits_cloud


class FieldApp:
    """One device's app: predictions through the hybrid router on the active model, recorded for the agent."""

    def __init__(self, data_dir: Path, x: np.ndarray) -> None:
        from device_agents.telemetry import Recorder
        from hybrid_router.classifier import HybridClassifier

        self.recorder = Recorder(data_dir, background=False)
        self.router = HybridClassifier.from_active(data_dir, recorder=self, check_interval_s=0.2)
        self.x = x
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def record(self, **kw) -> None:  # noqa: ANN003 - the Recorder protocol; attributed to the model that answered
        self.recorder.record(**kw, model_sha256=self.router.model_sha256)

    def _run(self) -> None:
        i, last_flush = 0, time.monotonic()
        while not self.stop.is_set():
            self.router.predict(self.x[i % len(self.x)])
            i += 1
            if time.monotonic() - last_flush > 0.5:
                self.recorder.flush(include_current=True)  # partial minutes are additive on the server
                last_flush = time.monotonic()
            time.sleep(0.004)
        self.recorder.flush(include_current=True)


def test_a_version_that_escalates_twice_as_often_fails_its_first_wave_on_the_field_gate(
        start_fleet_server, fleet_bundles, slow_digits_bundles, digits_cloud, tmp_path: Path) -> None:
    from hybrid_router.calibrate import calibrate_router

    with np.load(digits_cloud["test"]) as t:
        x = t["x"].astype(np.float32)
    slow = next(r.bundle_dir for r in slow_digits_bundles.results if r.profile == "raspberry-pi-5")
    v1_dir = calibrate_router(fleet_bundles.dirs["v1"]["raspberry-pi-5"], digits_cloud["onnx"], digits_cloud["calib"], tmp_path / "cal1",
                              escalation_budget=0.05).bundle
    v2_dir = calibrate_router(slow, digits_cloud["onnx"], digits_cloud["calib"], tmp_path / "cal2", escalation_budget=0.30).bundle
    rate_v1, rate_v2 = _escalation_rate(v1_dir, x), _escalation_rate(v2_dir, x)
    assert rate_v2 >= 2 * rate_v1 and rate_v2 - rate_v1 > 0.05, (rate_v1, rate_v2)  # the premise, on the bundles themselves

    server = start_fleet_server(process=True)
    admin = server.admin
    v1 = upload(admin, "digits", [pack(v1_dir, tmp_path / "v1.ekb")])
    assert v1.status_code == 201, v1.text
    v2 = upload(admin, "digits", [pack(v2_dir, tmp_path / "v2.ekb")])
    assert v2.status_code == 201, v2.text
    sha_v1 = v1.json()["artifacts"][0]["sha256"]

    env = {**os.environ, **AGENT_ENV, "PYTHONPATH": str(ROOT)}
    procs, dirs, apps = [], [], []
    try:
        for i in range(N_AGENTS):
            data = tmp_path / f"agent{i}"
            log = open(tmp_path / f"agent{i}.log", "wb")
            cmd = [sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())", "agent", "run", "--server", server.url,
                   "--enroll-token", server.enroll_token, "--data-dir", str(data), "--profile", "raspberry-pi-5", "--name", f"field{i}",
                   "--tag", "field", "-v"]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
            dirs.append(data)
        wait_for(lambda: len(admin.get("/v1/devices", params={"tag": "field"}).json()) == N_AGENTS, 90, "four devices enrolled")
        ids = {d["name"]: d["id"] for d in admin.get("/v1/devices").json()}

        r = admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "selector": {"tags": ["field"]}, "waves": [100]})
        assert r.status_code == 201, r.text
        rid1 = r.json()["id"]
        done = wait_for(lambda: (x_ := admin.get(f"/v1/rollouts/{rid1}").json())["state"] in ("completed", "failed") and x_, 240, "1.2.3 out")
        assert done["state"] == "completed", json.dumps(done, indent=1)[:3000]
        for data in dirs:
            wait_for(lambda: (p := read_active_pointer(data)) is not None and p.sha256 == sha_v1, 30, "agent on 1.2.3")

        for data in dirs:
            apps.append(FieldApp(data, x))
            apps[-1].thread.start()
        # 2.0.0: waves 25,100 with the field gate; the first wave (one device) bakes for 400 requests on it
        r = admin.post("/v1/rollouts", json={"model": "digits", "version": "2.0.0", "selector": {"tags": ["field"]}, "waves": [25, 100],
                                             "gates": {"max_escalation_increase": 0.05, "bake_s": 2, "bake_requests": 400},
                                             "wave_timeout_s": 240})
        assert r.status_code == 201, r.text
        ro = r.json()
        assert ro["gates"]["max_failure_rate"] == 0.0 and ro["gates"]["require_golden"] is True  # the safe defaults
        rid2 = ro["id"]
        (victim,) = [d["device_id"] for d in ro["waves"][0]["devices"]]
        k = next(i for i in range(N_AGENTS) if ids[f"field{i}"] == victim)
        r2 = wait_for(lambda: (x_ := admin.get(f"/v1/rollouts/{rid2}").json())["state"] in ("completed", "failed") and x_, 300, "2.0.0 decided")
        assert r2["state"] == "failed", json.dumps(r2, indent=1)[:4000]
        first = r2["waves"][0]
        gates = {g["gate"]: g for g in first["gate_results"]}
        assert gates["require_golden"]["passed"] is True  # fine on its golden set, on the device
        assert gates["max_failure_rate"]["passed"] is True
        esc = gates["max_escalation_increase"]
        assert esc["passed"] is False and esc["value"] > 0.05, esc
        assert "outside the wave" in esc["note"]
        assert "max_escalation_increase" in r2["reason"] and r2["waves"][1]["state"] == "pending"

        # the wave's device returns to 1.2.3; the others never left it
        wait_for(lambda: (p := read_active_pointer(dirs[k])) is not None and p.sha256 == sha_v1, 60, "victim back on 1.2.3")
        wait_for(lambda: admin.get(f"/v1/devices/{victim}").json()["active"]["version"] == "1.2.3", 60, "server sees the victim on 1.2.3")
        for i, data in enumerate(dirs):
            assert read_active_pointer(data).sha256 == sha_v1
        # what the field saw, by registry version: 2.0.0 escalated at least twice as often as 1.2.3
        since = ro["created_at"][:16] + ":00Z"  # telemetry is per minute: from the minute the rollout started
        s1 = admin.get("/v1/models/digits/versions/1.2.3/stats", params={"since": since}).json()["totals"]
        s2 = admin.get("/v1/models/digits/versions/2.0.0/stats", params={"since": since}).json()["totals"]
        assert s2["requests"] >= 400 and s1["requests"] > 0
        assert s2["escalation_rate"] >= 2 * s1["escalation_rate"], (s1["escalation_rate"], s2["escalation_rate"])
        assert s2["drift"]["reference"].startswith("calibration")  # 2.0.0's policy carries its calibration histogram
    finally:
        for app in apps:
            app.stop.set()
        for app in apps:
            app.thread.join(10)
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
