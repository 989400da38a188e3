"""The agent needs only the ``agent`` extra: it works where TensorFlow, Keras and coremltools cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agent_support import ROOT, agent_cmd

BLOCKED = ("tensorflow", "keras", "coremltools", "tf2onnx", "onnx")


def test_install_and_status_run_without_tensorflow_or_coremltools(bundles, agent_env, tmp_path: Path) -> None:
    block = tmp_path / "block"
    for name in BLOCKED:  # importing any of these now fails, in the agent and in its profiler child
        (block / name).mkdir(parents=True)
        (block / name / "__init__.py").write_text(f"raise ImportError('{name} is not part of the agent extra')\n")
    env = {**agent_env, "PYTHONPATH": f"{block}:{ROOT}"}
    data = tmp_path / "dev"
    done = subprocess.run(agent_cmd("install", str(bundles["pi"]), "--data-dir", str(data), "--profile", "raspberry-pi-5", "--json"),
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] and result["profile"]["golden_passed"]
    done = subprocess.run(agent_cmd("status", "--data-dir", str(data), "--json"), env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout)["active"]["version"] == "1.2.3"
    probe = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "not part of the agent extra" in probe.stderr  # the block is real
