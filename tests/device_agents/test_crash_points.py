"""Deterministic crash points: the process dies inside a step (a BaseException escapes, nothing is
cleaned up), then a fresh runner reads what was persisted, as after a restart, and must finish the job.

Complements the random SIGKILLs of test_kill.py with the exact spots between two side effects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_agents.client import FleetClient
from device_agents.machine import Event, State
from device_agents.profiler import ProfileSettings
from device_agents.settings import AgentSettings
from device_agents.slots import Slots
from device_agents.steps import open_runner
from device_agents.store import DataDir
from edgekit.bundle import sha256_file
from edgekit.runtime import read_active_pointer
from scripted_server import ScriptedServer

# Local installs here trust any publisher: crash safety is tested, publisher trust is tests/device_agents/test_trust.py.
SETTINGS = AgentSettings(profile="raspberry-pi-5", formats=("tflite",), profiling=ProfileSettings(runs=10, budget_s=0.3, warmup=1),
                         insecure_any_publisher=True)


class Died(BaseException):
    """The process died here."""


def crash_once(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, after: bool = False) -> None:
    real = getattr(owner, name)
    fired = []

    def dying(*args, **kwargs):
        if not fired:
            fired.append(1)
            if after:
                real(*args, **kwargs)
            raise Died(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, dying)


CRASH_POINTS = [
    (Slots, "_commit", False),       # verifying: bundle checked, slot not yet renamed into place
    (Slots, "_commit", True),        # verifying: slot in place, download not yet removed
    (Slots, "point_to", False),      # activating: before the pointer is switched
    (Slots, "point_to", True),       # activating: switched, transition not yet persisted
    (Slots, "gc", False),            # active: before the report is persisted
]


@pytest.mark.parametrize("owner, name, after", CRASH_POINTS, ids=[f"{n}-{'after' if a else 'before'}" for _, n, a in CRASH_POINTS])
def test_fleet_job_survives_a_crash_between_side_effects(bundles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, owner, name, after) -> None:
    server = ScriptedServer().start()
    try:
        art = server.add_bundle(bundles["pi"], tmp_path / "ekb")
        signed = server.assign(server.payload(art))
        data = DataDir(tmp_path / "dev").ensure()
        identity = {"device_id": server.device_id, "server_public_key": server.public_key, "profile": "raspberry-pi-5"}
        client = FleetClient(server.url, server.token)
        runner = open_runner(data, SETTINGS, identity=identity, client=client)
        runner.start(Event.ASSIGNED, {"kind": "fleet", "signed": signed, "before": {"sha256": None, "previous": None}})
        crash_once(monkeypatch, owner, name, after)
        with pytest.raises(Died):
            runner.run_until_idle()
        monkeypatch.undo()
        # restart: a new runner on what is on disk
        runner = open_runner(data, SETTINGS, identity=identity, client=client)
        assert runner.state is not State.IDLE
        runner.run_until_idle()
        result = runner.ctx.record["last_result"]
        assert result["failure"] is None, result["failure"]
        assert read_active_pointer(data.root).sha256 == art["sha256"]
        Slots(data).verify(art["sha256"])
        assert not Slots(data).part_path(art["sha256"]).exists()
        assert [r["phase"] for r in runner.ctx.record["outbox"]][-1] == "activated"
        client.close()
    finally:
        server.stop()


def test_local_install_survives_a_crash_while_saving_state(bundles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = DataDir(tmp_path / "dev").ensure()
    runner = open_runner(data, SETTINGS)
    sha = sha256_file(bundles["pi"])
    runner.start(Event.LOCAL_INSTALL, {"kind": "local", "source": str(bundles["pi"]), "sha256": sha, "before": {"sha256": None, "previous": None}})
    crash_once(monkeypatch, DataDir, "save_state")  # the write of the next transition never happens
    with pytest.raises(Died):
        runner.run_until_idle()
    monkeypatch.undo()
    assert json.loads(data.state_path.read_text())["state"] == "verifying"
    runner = open_runner(data, SETTINGS)
    runner.run_until_idle()
    assert runner.ctx.record["last_result"]["failure"] is None and read_active_pointer(data.root).sha256 == sha
