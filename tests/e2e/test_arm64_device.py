"""The agent on a Debian 12 arm64 root with its stock Python 3.11.2: real aarch64 binaries, real server.

scripts/arm64-root.sh builds the root once (cached in /var/cache/edgekit, outside the checkout)
and installs ``edgekit[agent]`` from this checkout into a venv of the root's own python3; the
aarch64 wheels of ai-edge-litert and onnxruntime run through qemu-user. The fleet server runs on
the host (127.0.0.1); two agents run in the root with ``chroot`` (only /proc mounted). Timings
under emulation mean nothing and are reported as such; binaries, kernels, numerics and the OS are
real. Skipped only where the machine cannot (not root, no binfmt_misc, packages missing).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from arm64_support import LITERT_ONLY_VENV, Arm64Root, arm64_unavailable_reason, build_arm64_root
from device_agents.slots import Slots
from device_agents.store import DataDir
from edgekit.bundle import pack
from edgekit.cpuinfo import EMULATED_TIMING_NOTE
from edgekit.runtime import read_active_pointer
from fleet_support import free_port, upload, wait_for

pytestmark = pytest.mark.timeout(1800)  # a fresh machine builds the root first (about 4 min here)
ROOT = Path(__file__).resolve().parents[2]
AGENT_ENV = {"EDGEKIT_AGENT_POLL_INTERVAL_S": "0.5", "EDGEKIT_AGENT_PROFILE_RUNS": "20", "EDGEKIT_AGENT_PROFILE_BUDGET_S": "1",
             "EDGEKIT_AGENT_PROFILE_WARMUP": "2", "EDGEKIT_AGENT_BACKOFF_BASE_S": "0.2", "EDGEKIT_AGENT_BACKOFF_MAX_S": "2"}


@pytest.fixture(scope="session")
def arm64_root() -> Iterator[Arm64Root]:
    """The built root with /proc mounted for the session (unmounted at the end, also on failure)."""
    reason = arm64_unavailable_reason()
    if reason:
        pytest.skip(reason)
    path, why = build_arm64_root()
    if path is None:
        if "binfmt" in why:
            pytest.skip(f"aarch64 binaries cannot run on this machine: {why}")
        pytest.fail(f"scripts/arm64-root.sh failed:\n{why}")
    root = Arm64Root(path)
    with root.session():
        yield root


@pytest.fixture
def fleet_db(tmp_path: Path) -> str:
    """SQLite only: this test is about the device; the server's own suite covers PostgreSQL."""
    return f"sqlite:///{tmp_path / 'fleet.db'}"


@pytest.fixture(scope="session")
def onnx_pi_bundle(digits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits 1.3.0 for raspberry-pi-5 as an INT8 ONNX bundle (ONNX Runtime on the device)."""
    from converters.pipeline import ConvertOptions, run_convert

    out = tmp_path_factory.mktemp("arm64-onnx")
    report = run_convert(ConvertOptions(model=digits["model"], profiles=("raspberry-pi-5",), formats=("onnx",), calibration=digits["calib"],
                                        eval=digits["eval"], out=out / "bundles", name="digits", version="1.3.0", latency_runs=5))
    (result,) = report.results
    return result.bundle_dir


@contextlib.contextmanager
def cloud_server(model: Path) -> Iterator[str]:
    """``edgekit cloud serve`` on the host (float digits model), a real process on a free port."""
    port = free_port()
    env = {**os.environ, "EDGEKIT_CACHE_DIR": str(ROOT / ".cache" / "tests" / "edgekit-cache")}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())", "cloud", "serve",
                             str(model), "--name", "digits", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else "cloud server exited"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < end, "cloud server not ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.kill()
        proc.wait(10)


IN_ROOT_CHECKS = r'''
import json, platform, sys
import numpy as np
from edgekit.bundle import open_bundle
from edgekit.detect import detect_profile
from edgekit.runtime import load
from hybrid_router import EscalationPolicy, HybridClassifier, KServeClient

tflite, onnx, cloud_url, eval_npz = sys.argv[1:5]
out = {"machine": platform.machine(), "python": platform.python_version(), "models": {}}
for path in (tflite, onnx):
    m = load(path)
    golden = open_bundle(path).golden()
    y = np.concatenate([m.predict(x[None]) for x in golden["x"]])
    out["models"][m.manifest.format] = {"runtime": m.runtime, "delegate": m.delegate, "y": y.tolist(),
                                        "max_abs_err": float(np.max(np.abs(y - golden["y_host"])))}
xs = np.load(eval_npz)["x"][:12]
local = load(tflite)
never = HybridClassifier(local, None, EscalationPolicy(temperature=1.0, threshold=0.0))
always = HybridClassifier(local, KServeClient(cloud_url, "digits"), EscalationPolicy(temperature=1.0, threshold=1.000001), deadline_ms=30000)
out["local"] = [[p.label, p.source, p.degraded] for p in (never.predict(x) for x in xs)]
out["cloud"] = [[p.label, p.source, p.degraded, p.reason] for p in (always.predict(x) for x in xs)]
p = detect_profile()
out["profile"] = {"name": p.name, "arch": p.cpu.arch, "model": p.cpu.model, "features": list(p.cpu.features)}
print(json.dumps(out))
'''


def test_runtime_router_and_detect_inside_the_root(arm64_root: Arm64Root, digits, digits_bundles, onnx_pi_bundle: Path) -> None:
    """edgekit.runtime.load on aarch64 LiteRT/XNNPACK and ONNX Runtime reproduces the golden set; a
    HybridClassifier answers from the device and from a cloud server on the host; detect says emulated."""
    from edgekit.runtime import load
    from hybrid_router import EscalationPolicy, HybridClassifier, KServeClient

    pi = next(r.bundle_dir for r in digits_bundles.results if r.profile == "raspberry-pi-5")
    tfl, onx = arm64_root.copy_in(pi, "runtime/tflite"), arm64_root.copy_in(onnx_pi_bundle, "runtime/onnx")
    ev = arm64_root.copy_in(digits["eval"], "runtime/eval.npz")
    script = arm64_root.work / "runtime" / "checks.py"
    script.write_text(IN_ROOT_CHECKS)
    with cloud_server(digits["model"]) as url:
        proc = arm64_root.run("python", arm64_root.inside(script), arm64_root.inside(tfl), arm64_root.inside(onx), url,
                              arm64_root.inside(ev), timeout=600)
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        xs = np.load(digits["eval"])["x"][:12]
        with KServeClient(url, "digits") as client:  # the same requests from the host
            host_clf = HybridClassifier(load(pi), client, EscalationPolicy(temperature=1.0, threshold=1.000001), deadline_ms=30000)
            cloud_labels = [host_clf.predict(x).label for x in xs]

    assert got["machine"] == "aarch64" and got["python"] == "3.11.2"  # Debian 12's own interpreter, an aarch64 build
    tf, ox = got["models"]["tflite"], got["models"]["onnx"]
    assert (tf["runtime"], tf["delegate"]) == ("litert", "xnnpack")
    assert ox["runtime"] == "onnxruntime"
    # Arm numerics: the integer kernels give the x86 host's golden outputs exactly
    assert tf["max_abs_err"] == 0.0, tf["max_abs_err"]
    host_onnx = load(onnx_pi_bundle)
    golden = np.load(onnx_pi_bundle / "golden.npz")
    y_host = np.concatenate([host_onnx.predict(x[None]) for x in golden["x"]])
    assert np.array_equal(np.argmax(np.asarray(ox["y"]), -1), np.argmax(y_host, -1))
    assert ox["max_abs_err"] <= 0.05, ox["max_abs_err"]

    host_local = load(pi)
    assert [row[0] for row in got["local"]] == [int(np.argmax(host_local.predict(x[None]))) for x in xs]
    assert {row[1] for row in got["local"]} == {"device"}
    assert all(row[1] == "cloud" and not row[2] for row in got["cloud"]), got["cloud"]
    assert [row[0] for row in got["cloud"]] == cloud_labels

    prof = got["profile"]
    assert prof["arch"] == "arm64" and EMULATED_TIMING_NOTE in prof["name"]
    assert "Cortex" not in prof["model"] and "neon" in prof["features"]


def _agent(root: Arm64Root, server, name: str) -> tuple[subprocess.Popen, Path]:
    data = root.work / "agents" / name
    data.parent.mkdir(parents=True, exist_ok=True)
    env = {**AGENT_ENV, "EDGEKIT_AGENT_ENROLL_TOKEN": server.enroll_token}
    proc = root.popen("edgekit", "agent", "run", "--server", server.url, "--data-dir", root.inside(data), "--profile", "raspberry-pi-5",
                      "--name", name, "--tag", "arm64", "-v", env=env, log=root.work / "agents" / f"{name}.log")
    return proc, data


def _rollout(admin: httpx.Client, version: str, gates: dict) -> dict:
    r = admin.post("/v1/rollouts", json={"model": "digits", "version": version, "selector": {"profiles": [], "tags": ["arm64"]},
                                         "waves": [50, 100], "gates": gates, "wave_timeout_s": 600})
    assert r.status_code == 201, r.text
    rid = r.json()["id"]

    def done() -> dict | None:
        body = admin.get(f"/v1/rollouts/{rid}").json()
        return body if body["state"] in ("completed", "failed", "rolled_back") else None

    return wait_for(done, 600, f"rollout {version} decided")


def _profiled(rollout: dict) -> list[dict]:
    return [d["metrics"] for w in rollout["waves"] for d in w["devices"] if d.get("metrics")]


def test_arm64_agents_roll_out_two_waves_and_roll_back_a_version_that_fails_its_gate(
        arm64_root: Arm64Root, start_fleet_server, fleet_bundles, onnx_pi_bundle: Path, tmp_path: Path) -> None:
    server = start_fleet_server(process=True)
    admin = server.admin
    v1 = upload(admin, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"]])                      # 1.2.3 LiteRT
    v2 = upload(admin, "digits", [pack(onnx_pi_bundle, tmp_path / "digits-pi-onnx.ekb")])          # 1.3.0 ONNX Runtime
    v3 = upload(admin, "digits", [fleet_bundles.make("arm64-v3", version="1.4.0")])                # 1.4.0 LiteRT
    for r in (v1, v2, v3):
        assert r.status_code == 201, r.text
    sha = {v: r.json()["artifacts"][0]["sha256"] for v, r in (("1.2.3", v1), ("1.3.0", v2), ("1.4.0", v3))}

    agents = [_agent(arm64_root, server, f"arm{i}") for i in range(2)]
    try:
        wait_for(lambda: len(admin.get("/v1/devices", params={"tag": "arm64"}).json()) == 2, 180, "two arm64 agents enrolled")
        ids = {d["name"]: d["id"] for d in admin.get("/v1/devices").json()}

        # 1.2.3 in two waves: download, verify, profile (aarch64 LiteRT + XNNPACK), golden set, activate
        r1 = _rollout(admin, "1.2.3", {"max_failure_rate": 0.0, "require_golden": True})
        assert r1["state"] == "completed", json.dumps(r1, indent=1)[:3000]
        assert [len(w["devices"]) for w in r1["waves"]] == [1, 1]
        for m in _profiled(r1):
            assert (m["runtime"], m["delegate"]) == ("litert", "xnnpack") and m["golden_passed"] is True
            assert m["timing_source"] == "emulated" and m["timing_note"] == EMULATED_TIMING_NOTE
        for _, data in agents:
            wait_for(lambda d=data: (p := read_active_pointer(d)) is not None and p.sha256 == sha["1.2.3"], 60, "1.2.3 active")

        # 1.3.0 on ONNX Runtime; a p95 gate that every measured device would fail is not read under emulation
        r2 = _rollout(admin, "1.3.0", {"max_failure_rate": 0.0, "require_golden": True, "max_p95_ratio": 0.001})
        assert r2["state"] == "completed", json.dumps(r2, indent=1)[:3000]
        for m in _profiled(r2):
            assert m["runtime"] == "onnxruntime" and m["golden_passed"] is True and m["timing_source"] == "emulated"
        p95_gates = [g for w in r2["waves"] for g in w.get("gate_results", []) if g["gate"] == "max_p95_ratio"]
        assert p95_gates and all(g["passed"] is None for g in p95_gates), p95_gates
        for _, data in agents:
            wait_for(lambda d=data: (p := read_active_pointer(d)) is not None and p.sha256 == sha["1.3.0"], 60, "1.3.0 active")

        # the app on the device: the active model through a HybridClassifier, telemetry through the agent's Recorder
        app = arm64_root.work / "app.py"
        app.write_text(TELEMETRY_APP)
        arm64_root.run("python", arm64_root.inside(app), arm64_root.inside(agents[0][1]), timeout=300)
        points = wait_for(lambda: admin.get("/v1/telemetry", params={"device_id": ids["arm0"]}).json().get("points"), 120,
                      "telemetry from arm0 on the server")
        assert sum(p.get("count", 0) for p in points) >= 20, points

        # 1.4.0 fails its memory gate in the first wave: that device goes back to 1.3.0, the other never gets it
        r3 = _rollout(admin, "1.4.0", {"max_peak_rss_mb": 0.001})
        assert r3["state"] in ("failed", "rolled_back"), json.dumps(r3, indent=1)[:3000]
        first = r3["waves"][0]
        assert first["state"] == "failed" and len(first["devices"]) == 1
        gate = next(g for g in first["gate_results"] if g["gate"] == "max_peak_rss_mb")
        assert gate["passed"] is False and gate["value"] > 0.001
        victim = first["devices"][0]["device_id"]
        k = 0 if ids["arm0"] == victim else 1
        wait_for(lambda: admin.get(f"/v1/devices/{victim}").json()["active"]["version"] == "1.3.0", 120, "victim back on 1.3.0 (server)")
        wait_for(lambda: (p := read_active_pointer(agents[k][1])) is not None and p.sha256 == sha["1.3.0"], 60, "victim back on 1.3.0")
        other = agents[1 - k][1]
        assert read_active_pointer(other).sha256 == sha["1.3.0"]
        assert not Slots(DataDir(other)).has(sha["1.4.0"])
        assert Slots(DataDir(agents[k][1])).info(sha["1.4.0"])["blocked"] == "reverted"

        status = arm64_root.run("edgekit", "agent", "status", "--data-dir", arm64_root.inside(agents[k][1]))
        text = " ".join(status.stdout.split())  # rich wraps at 80 columns off a terminal
        assert "active: digits 1.3.0" in text and EMULATED_TIMING_NOTE in text, status.stdout
    finally:
        for proc, _ in agents:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc, _ in agents:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


TELEMETRY_APP = r'''
import sys
import numpy as np
from device_agents.telemetry import Recorder
from hybrid_router import EscalationPolicy, HybridClassifier
from edgekit.runtime import load_active

data_dir = sys.argv[1]
recorder = Recorder(data_dir, flush_interval_s=0.1)
local = load_active(data_dir)
clf = HybridClassifier(local, None, EscalationPolicy(temperature=1.0, threshold=0.0), recorder=recorder)
xs = np.random.default_rng(0).random((24, 8, 8, 1), dtype=np.float32)
labels = [clf.predict(x).label for x in xs]
recorder.flush(include_current=True)
print(labels)
'''


def test_bundles_this_device_cannot_load_are_refused_at_verification(arm64_root: Arm64Root, fleet_format_bundles) -> None:
    """Core ML on Linux and ONNX on a LiteRT-only install: refused with the reason, nothing activated."""
    cases = [(fleet_format_bundles[("iphone-15-pro", "coreml")], "iphone-15-pro", None, "Core ML"),
             (fleet_format_bundles[("pixel-8", "onnx")], "pixel-8", LITERT_ONLY_VENV, "onnxruntime")]
    for i, (ekb, profile, venv, why) in enumerate(cases):
        bundle = arm64_root.copy_in(ekb, f"refused/{i}.ekb")
        data = arm64_root.work / "refused" / f"data{i}"
        kwargs = {"venv": venv} if venv else {}
        proc = arm64_root.run("edgekit", "agent", "install", arm64_root.inside(bundle), "--data-dir", arm64_root.inside(data),
                              "--profile", profile, "--json", env={"EDGEKIT_AGENT_INSECURE_ANY_PUBLISHER": "1"}, check=False, **kwargs)
        assert proc.returncode != 0, proc.stdout
        assert "Traceback" not in proc.stderr, proc.stderr
        result = json.loads(proc.stdout)
        assert not result["ok"] and result["failure"]["reason"] == "other:runtime_unavailable", result
        assert why in result["failure"]["message"], result
        assert result["active"] is None and read_active_pointer(data) is None
