"""The device side on Python 3.10 (Ubuntu 22.04 / JetPack 6): install ``edgekit[agent]``, run it.

A venv of pyenv's 3.10 gets the agent extra from PyPI once (cached outside the checkout, in
$EDGEKIT_ARM64_CACHE or /var/cache/edgekit, like the arm64 root) and this checkout's edgekit on
every run. In it: ``edgekit agent install`` verifies, profiles and activates the digits bundle;
``edgekit.runtime.load`` reproduces the golden outputs; a HybridClassifier records telemetry
through the agent's Recorder. Skipped only when no 3.10 interpreter is installed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(1200)
ROOT = Path(__file__).resolve().parents[2]
PYENV = Path.home() / ".pyenv" / "versions"


def _cache_dir() -> Path:
    base = Path(os.environ.get("EDGEKIT_ARM64_CACHE", "/var/cache/edgekit"))
    if not os.access(base.parent if not base.exists() else base, os.W_OK):
        base = Path.home() / ".cache" / "edgekit"
    base.mkdir(parents=True, exist_ok=True)
    return base


@pytest.fixture(scope="session")
def py310_venv() -> Path:
    """A Python 3.10 venv with edgekit[agent] from this checkout (dependencies cached; edgekit reinstalled each session)."""
    found = sorted(PYENV.glob("3.10.*/bin/python"))
    if not found:
        pytest.skip("no Python 3.10 interpreter under ~/.pyenv/versions (pyenv install 3.10 to run this test)")
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    key = hashlib.sha256(pyproject).hexdigest()[:12]
    cache = _cache_dir()
    venv = cache / "py310-agent-venv"
    with open(cache / "py310-agent-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = venv / ".edgekit-deps-stamp"
        if not stamp.exists() or stamp.read_text() != key:
            subprocess.run([str(found[-1]), "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
            pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q", "install"]
            proc = subprocess.run([*pip, f"{ROOT}[agent]", "setuptools>=68", "wheel"], capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, f"pip install edgekit[agent] on Python 3.10 failed:\n{proc.stderr[-4000:]}"
            stamp.write_text(key)
        proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps",
                               "--no-build-isolation", "--force-reinstall", str(ROOT)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return venv


CHECKS = r'''
import json, platform, sys
import numpy as np
from device_agents.telemetry import Recorder
from edgekit.bundle import open_bundle
from edgekit.detect import detect_profile
from edgekit.runtime import load, load_active
from hybrid_router import EscalationPolicy, HybridClassifier

bundle, data_dir = sys.argv[1:3]
m = load(bundle)
golden = open_bundle(bundle).golden()
y = np.concatenate([m.predict(x[None]) for x in golden["x"]])
recorder = Recorder(data_dir, flush_interval_s=0.1)
clf = HybridClassifier(load_active(data_dir), None, EscalationPolicy(temperature=1.0, threshold=0.0), recorder=recorder)
labels = [clf.predict(x).label for x in golden["x"]]
points = recorder.flush(include_current=True)
print(json.dumps({"python": platform.python_version(), "max_abs_err": float(np.max(np.abs(y - golden["y_host"]))),
                  "runtime": m.runtime, "labels": labels, "golden_labels": np.argmax(golden["y_host"], -1).tolist(),
                  "points": points, "arch": detect_profile().cpu.arch}))
'''


def test_agent_installs_and_runs_on_python_3_10(py310_venv: Path, digits_bundles, tmp_path: Path) -> None:
    pi = next(r.bundle_dir for r in digits_bundles.results if r.profile == "raspberry-pi-5")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env |= {"EDGEKIT_AGENT_PROFILE_RUNS": "20", "EDGEKIT_AGENT_PROFILE_BUDGET_S": "0.5", "EDGEKIT_AGENT_INSECURE_ANY_PUBLISHER": "1"}
    data = tmp_path / "agent"
    edgekit = str(py310_venv / "bin" / "edgekit")
    proc = subprocess.run([edgekit, "agent", "install", str(pi), "--data-dir", str(data), "--profile", "raspberry-pi-5", "--json"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    result = json.loads(proc.stdout)
    assert result["ok"] and result["profile"]["golden_passed"] is True and result["profile"]["timing_source"] == "measured"

    script = tmp_path / "checks.py"
    script.write_text(CHECKS)
    run = subprocess.run([str(py310_venv / "bin" / "python"), str(script), str(pi), str(data)], capture_output=True, text=True,
                         timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["python"].startswith("3.10.")
    assert got["max_abs_err"] == 0.0 and got["runtime"] == "litert"
    assert got["points"] >= 1 and got["arch"] == ("x86_64" if os.uname().machine == "x86_64" else "arm64")
    agreement = sum(a == b for a, b in zip(got["labels"], got["golden_labels"])) / len(got["labels"])
    assert agreement >= 0.9
