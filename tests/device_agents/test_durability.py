"""Durability order and revert targets, checked on the real code paths.

A power cut cannot be simulated here, but the order of the calls that make data durable can be
observed: ``os.fsync`` and ``os.replace`` are wrapped (they still do their work) and every call is
recorded with the path it acted on (``/proc/self/fd``). A slot's files and directories, and the
``models/`` entry that names it, must be on disk before ``active.json`` names the slot.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from device_agents.client import FleetClient
from device_agents.machine import Event
from device_agents.profiler import ProfileSettings
from device_agents.settings import AgentSettings
from device_agents.slots import Slots
from device_agents.steps import open_runner
from device_agents.store import DataDir
from edgekit.bundle import open_bundle, sha256_file
from edgekit.runtime import ACTIVE_POINTER, read_active_pointer
from scripted_server import ScriptedServer, sign_payload

# Local installs here trust any publisher: crash safety is tested, publisher trust is tests/device_agents/test_trust.py.
SETTINGS = AgentSettings(profile="raspberry-pi-5", formats=("tflite",), profiling=ProfileSettings(runs=10, budget_s=0.3, warmup=1),
                         insecure_any_publisher=True)


def observe_durability(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Record ("fsync", path) and ("replace", src, dst) in call order; the real calls still run."""
    log: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kw) -> None:
        real_replace(src, dst, **kw)
        log.append(("replace", os.path.realpath(src), os.path.realpath(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log


def durable_names(log: list[tuple]) -> set[str]:
    """Paths whose content was fsynced, following renames (an fsynced temp file renamed to X makes X durable)."""
    names: set[str] = set()
    for e in log:
        if e[0] == "fsync":
            names.add(e[1])
        else:
            _, src, dst = e
            moved = {n for n in names if n == src or n.startswith(src + "/")}
            names = (names - moved) | {dst + n[len(src):] for n in moved}
    return names


def assert_slot_durable_before_pointer(log: list[tuple], data: DataDir, sha: str) -> None:
    models = os.path.realpath(data.models)
    slot = Path(models) / sha
    tmp = Path(models) / f".{sha}.tmp"
    pointer = os.path.realpath(data.root / ACTIVE_POINTER)
    renames = [i for i, e in enumerate(log) if e[0] == "replace" and e[1] == str(tmp) and e[2] == str(slot)]
    switches = [i for i, e in enumerate(log) if e[0] == "replace" and e[2] == pointer]
    assert len(renames) == 1 and switches, (renames, switches)
    i_slot, i_ptr = renames[0], switches[0]
    assert i_slot < i_ptr
    before_rename = durable_names(log[:i_slot])
    files = [p for p in slot.rglob("*") if p.is_file()]
    dirs = [slot, *(p for p in slot.rglob("*") if p.is_dir())]
    assert {p.name for p in files} >= {"slot.json", "manifest.json"} and len(dirs) >= 2
    missing = [str(p.relative_to(slot)) or "." for p in files + dirs if str(tmp / p.relative_to(slot)) not in before_rename]
    assert not missing, f"not fsynced before the slot was renamed into place: {missing}"
    assert ("fsync", models) in log[i_slot + 1:i_ptr], "models/ was not fsynced between the slot's rename and the pointer switch"


def test_fleet_slot_is_durable_before_the_pointer_names_it(bundles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = ScriptedServer().start()
    try:
        art = server.add_bundle(bundles["pi"], tmp_path / "ekb")
        signed = server.assign(server.payload(art))
        data = DataDir(tmp_path / "dev").ensure()
        identity = {"device_id": server.device_id, "server_public_key": server.public_key, "profile": "raspberry-pi-5"}
        client = FleetClient(server.url, server.token)
        try:
            runner = open_runner(data, SETTINGS, identity=identity, client=client)
            log = observe_durability(monkeypatch)
            runner.start(Event.ASSIGNED, {"kind": "fleet", "signed": signed, "before": {"sha256": None, "previous": None}})
            runner.run_until_idle()
        finally:
            client.close()
        assert runner.ctx.record["last_result"]["failure"] is None
        assert read_active_pointer(data.root).sha256 == art["sha256"]
        assert_slot_durable_before_pointer(log, data, art["sha256"])
    finally:
        server.stop()


def test_local_slot_is_durable_before_the_pointer_names_it(bundles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = DataDir(tmp_path / "dev").ensure()
    sha = sha256_file(bundles["pi"])
    runner = open_runner(data, SETTINGS)
    log = observe_durability(monkeypatch)
    runner.start(Event.LOCAL_INSTALL, {"kind": "local", "source": str(bundles["pi"]), "sha256": sha, "before": {"sha256": None, "previous": None}})
    runner.run_until_idle()
    assert runner.ctx.record["last_result"]["failure"] is None and read_active_pointer(data.root).sha256 == sha
    assert_slot_durable_before_pointer(log, data, sha)


def _local_slot(slots: Slots, bundle: Path) -> dict:
    """A slot made from a bundle directory, and the artifact a signed revert names to return to it."""
    sha = sha256_file(bundle)
    m = open_bundle(bundle).manifest
    slots.create_from_source(sha, bundle, {"source": str(bundle)},
                             lambda d: {"name": m.name, "version": m.version, "profile": m.profile, "format": m.format})
    return {"sha256": sha, "size_bytes": 1, "profile": m.profile, "format": m.format, "file": m.file,
            "manifest_sha256": "0" * 64, "url": f"/v1/artifacts/{sha}", "model": m.name, "version": m.version}


def test_a_revert_never_returns_to_a_slot_blocked_as_bad(bundles, tmp_path: Path) -> None:
    """B active over A; the server reverts to A (B is blocked: reverted); a later revert naming B is refused, A stays."""
    server = ScriptedServer()  # used only to sign; no HTTP: a revert downloads nothing
    data = DataDir(tmp_path / "dev").ensure()
    slots = Slots(data)
    a, b = _local_slot(slots, bundles["pi"]), _local_slot(slots, bundles["pi_b"])
    slots.point_to(b["sha256"], previous=a["sha256"])
    identity = {"device_id": server.device_id, "server_public_key": server.public_key, "profile": "raspberry-pi-5"}

    def revert_to(art: dict) -> dict:
        runner = open_runner(data, SETTINGS, identity=identity)
        signed = sign_payload(server.key, server.payload(art, action="revert", reason="gate_failed"))
        runner.start(Event.ASSIGNED, {"kind": "fleet", "signed": signed,
                                      "before": {"sha256": slots.active_sha(), "previous": slots.previous_sha()}})
        runner.run_until_idle()
        return runner.ctx.record["last_result"]

    first = revert_to(a)
    assert first["failure"] is None and slots.active_sha() == a["sha256"]
    assert slots.info(b["sha256"])["blocked"] == "reverted"
    assert [(r["phase"], r["reason"]) for r in first["reports"]] == [("rolled_back", "gate_failed")]

    second = revert_to(b)
    assert (second["failure"] or {}).get("reason") == "other:revert_target_blocked", second
    assert [(r["phase"], r["reason"]) for r in second["reports"]] == [("failed", "other:revert_target_blocked")]
    assert slots.active_sha() == a["sha256"]  # the current model is kept
    slots.verify(a["sha256"])
    assert slots.info(b["sha256"])["blocked"] == "reverted" and slots.info(a["sha256"])["blocked"] is None

