"""``edgekit agent install``: verify → profile → activate for local bundles, on real LiteRT."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgekit.bundle import pack, sha256_file
from edgekit.errors import RuntimeUnavailableError
from edgekit.runtime import load_active, read_active_pointer

from agent_support import ROOT, agent_cmd, wait_for

pytestmark = pytest.mark.timeout(300)


def install(run_cli, bundle: Path, data: Path, *extra: str) -> tuple[int, dict]:
    code, out, err = run_cli("agent", "install", bundle, "--data-dir", data, "--profile-runs", "20", "--profile-budget-s", "0.5",
                             "--warmup", "2", "--json", *extra)
    return code, json.loads(out)


def test_install_directory_then_ekb_switches_and_keeps_previous(bundles, run_cli, tmp_path: Path) -> None:
    data = tmp_path / "dev"
    code, r = install(run_cli, bundles["pi"], data, "--profile", "raspberry-pi-5")
    assert code == 0 and r["ok"] and r["phases"] == ["verified", "profiled", "activated"]
    p = r["profile"]
    assert p["runs"] >= 1 and 0 < p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"] and p["load_ms"] > 0
    assert p["golden_top1_agreement"] == 1.0 and p["golden_passed"] and p["runtime"] == "litert" and p["delegate"] == "xnnpack"
    assert p["peak_rss_mb"] > 0 and p["baseline"] is None
    first = r["sha256"]
    assert first == sha256_file(bundles["pi"]) and r["active"]["sha256"] == first

    ekb = pack(bundles["pi_b"], tmp_path / "b.ekb")
    code, r = install(run_cli, ekb, data, "--profile", "raspberry-pi-5")
    assert code == 0 and r["ok"] and r["version"] == "1.3.0" and r["sha256"] == sha256_file(ekb)
    assert r["profile"]["baseline"]["sha256"] == first and r["profile"]["baseline"]["p95_ms"] > 0  # measured in the same session
    ptr = read_active_pointer(data)
    assert ptr.sha256 == r["sha256"] and ptr.version == "1.3.0"
    assert json.loads((data / "active.json").read_text())["previous"] == first
    assert (data / "models" / first / "bundle").is_dir()  # previous slot kept

    code, out, _ = run_cli("agent", "status", "--data-dir", data, "--json")
    st = json.loads(out)
    assert code == 0 and st["state"] == "idle" and st["active"]["version"] == "1.3.0" and st["previous"]["sha256"] == first
    assert st["last_profile"]["version"] == "1.3.0" and st["telemetry"]["capacity"] == 10_000


@pytest.mark.parametrize("case, reason", [("wrong_profile", "wrong_profile"), ("golden", "golden_mismatch"),
                                          ("changed_byte", "bundle_invalid")])
def test_refused_bundles_leave_the_previous_model_active(bundles, run_cli, tmp_path: Path, case: str, reason: str) -> None:
    data = tmp_path / "dev"
    code, good = install(run_cli, bundles["pi"], data, "--profile", "raspberry-pi-5")
    assert code == 0
    if case == "wrong_profile":
        bad = bundles["coral"]
    elif case == "golden":
        bad = bundles["pi_bad_golden"]
    else:
        bad = shutil.copytree(bundles["pi_b"], tmp_path / "changed")
        model = bad / "digits.tflite"
        raw = bytearray(model.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        model.write_bytes(bytes(raw))
    code, r = install(run_cli, bad, data, "--profile", "raspberry-pi-5")
    assert code == 9 and not r["ok"] and r["failure"]["reason"] == reason
    assert r["active"]["sha256"] == good["sha256"] == read_active_pointer(data).sha256
    assert r["phases"][-1] == "failed"
    if case == "golden":
        assert r["profile"]["golden_top1_agreement"] == 0.0 and "profiled" in r["phases"]


def test_load_active_follows_the_agents_switch(bundles, run_cli, tmp_path: Path) -> None:
    data = tmp_path / "dev"
    with pytest.raises(RuntimeUnavailableError):
        load_active(data)
    install(run_cli, bundles["pi"], data)
    model = load_active(data, check_interval_s=0.0)
    x = np.load(bundles["pi"] / "golden.npz")["x"][:1]
    assert model.version == "1.2.3" and model.predict(x).shape == (1, 10)
    install(run_cli, bundles["pi_b"], data)
    model.predict(x)
    assert model.version == "1.3.0" and model.sha256 == read_active_pointer(data).sha256


def test_old_slots_are_collected_beyond_keep(bundles, run_cli, tmp_path: Path) -> None:
    data = tmp_path / "dev"
    shas = []
    for b in ("pi", "pi_b", "coral", "coral_b"):
        code, r = install(run_cli, bundles[b], data, "--keep-slots", "2")
        assert code == 0
        shas.append(r["sha256"])
    left = sorted(p.name for p in (data / "models").iterdir() if not p.name.startswith("."))
    assert left == sorted(shas[-2:])  # active + previous


def test_crash_loop_in_profiling_rolls_back(bundles, run_cli, agent_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL the installer in profiling twice (loop guard N=2): the third start rolls back instead of profiling again."""
    data = tmp_path / "dev"
    code, good = install(run_cli, bundles["pi"], data)
    assert code == 0
    env = {**agent_env, "EDGEKIT_AGENT_PROFILE_RUNS": "100000000", "EDGEKIT_AGENT_PROFILE_BUDGET_S": "60", "EDGEKIT_AGENT_MAX_ATTEMPTS": "2"}
    state = data / "state.json"

    def profiling(n: int) -> bool:
        rec = json.loads(state.read_text())
        return rec["state"] == "profiling" and rec["attempts"] == n

    for i in (1, 2):
        p = subprocess.Popen(agent_cmd("install", str(bundles["pi_b"]), "--data-dir", str(data), "--json"), env=env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: profiling(i), 60, f"profiling, attempt {i}")
        os.killpg(p.pid, signal.SIGKILL)  # the agent and its profiler child
        p.wait()
        assert read_active_pointer(data).sha256 == good["sha256"]
    monkeypatch.setenv("EDGEKIT_AGENT_MAX_ATTEMPTS", "2")
    code, r = install(run_cli, bundles["pi_b"], data)
    resumed = r["resumed"]
    assert resumed["failure"]["reason"] == "crash_loop"
    assert ["profiling", "crash_loop", "rolling_back"] in resumed["transitions"]
    assert [t for t in resumed["transitions"] if t[0] == "profiling"] == [["profiling", "crash_loop", "rolling_back"]]
    # then the requested install ran from the start and succeeded
    assert code == 0 and r["ok"] and read_active_pointer(data).version == "1.3.0"


def test_profile_auto_detects_this_machine_and_status_prints_for_people(bundles, run_cli, tmp_path: Path) -> None:
    data = tmp_path / "dev"
    code, r = install(run_cli, bundles["pi"], data, "--profile", "auto")
    # this host is not a Raspberry Pi 5: the detected profile refuses the bundle
    assert code == 9 and r["failure"]["reason"] == "wrong_profile" and "detected-" in r["failure"]["message"]
    code, r = install(run_cli, bundles["pi"], data)
    assert code == 0
    code, out, _ = run_cli("agent", "status", "--data-dir", data)
    assert code == 0 and "active: digits 1.2.3" in out and "last result: ok" in out and "telemetry buffer: 0/10000" in out
