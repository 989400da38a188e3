"""SIGKILL the agent at random moments across download, verify, profile and activate.

After every kill, before the restart: exactly one model is active (the old or the new one) and
its sha256 and bundle hashes verify. After the restart the agent converges on the assignment.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from agent_support import wait_for
from device_agents.slots import Slots
from device_agents.store import DataDir
from edgekit.runtime import read_active_pointer
from scripted_server import ScriptedServer

pytestmark = pytest.mark.timeout(280)
TARGETS = ("downloading", "verifying", "profiling", "activating")


def _state(data: Path) -> str | None:
    try:
        return json.loads((data / "state.json").read_text())["state"]
    except (FileNotFoundError, ValueError):
        return None


def test_sigkill_at_random_moments_never_leaves_a_half_model(bundles, spawn_agent, tmp_path: Path) -> None:
    rng = random.Random(int(time.time()))
    server = ScriptedServer().start()
    try:
        data = tmp_path / "dev"
        versions = [server.add_bundle(bundles[b], tmp_path / "ekb") for b in ("pi", "pi_b")]
        server.assign(server.payload(versions[0]))
        proc = spawn_agent(server.url, data)
        wait_for(lambda: ("activated", None) in server.phases(1) and _state(data) == "idle", 60, "first version")
        current = versions[0]["sha256"]
        server.throttle_s = 0.02  # ~50 KiB/s: a download lasts a few tenths of a second
        hit: dict[str, int] = {}
        kills = 0
        for round_no in range(40):
            if sum(hit.get(t, 0) for t in TARGETS) >= 10 and all(hit.get(t) for t in TARGETS):
                break
            target = TARGETS[round_no % len(TARGETS)]
            new = versions[(round_no + 1) % 2]
            serial = json.loads(server.assign(server.payload(new))["payload"])["serial"]
            # wait until the agent is in the target state, then kill it a random few milliseconds later
            deadline = time.monotonic() + 30
            while _state(data) != target and time.monotonic() < deadline and not (
                    ("activated", None) in server.phases(serial) and _state(data) == "idle"):
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.03))
            proc.kill()
            proc.wait()
            at = _state(data)
            kills += 1
            hit[at or "none"] = hit.get(at or "none", 0) + 1
            # invariant right after the kill: one model active, old or new, and its bytes verify
            ptr = read_active_pointer(data)
            assert ptr is not None and ptr.sha256 in (current, new["sha256"]), f"kill {kills} in {at}: {ptr}"
            Slots(DataDir(data)).verify(ptr.sha256)
            proc = spawn_agent(server.url, data, token=None)
            wait_for(lambda: ("activated", None) in server.phases(serial) and _state(data) == "idle", 90, f"convergence after kill {kills} in {at}")
            ptr = read_active_pointer(data)
            assert ptr.sha256 == new["sha256"]
            Slots(DataDir(data)).verify(ptr.sha256)
            current = new["sha256"]
        print(f"kills by state: {hit}")
        assert sum(hit.get(t, 0) for t in TARGETS) >= 10
        assert all(hit.get(t) for t in TARGETS), f"states hit by the kills: {hit}"
        assert all(reason is None for s in range(1, server.serial + 1) for _, reason in server.phases(s))  # no failure, no crash loop
    finally:
        server.stop()
