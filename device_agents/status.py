"""``edgekit agent status``: what the device is doing and running, read from its data dir only."""

from __future__ import annotations

import os

from edgekit.errors import EdgekitError

from device_agents.slots import Slots
from device_agents.store import DataDir
from device_agents.telemetry import TelemetryBuffer

__all__ = ["agent_status"]


def agent_status(data_dir: str | os.PathLike[str]) -> dict:
    """State, active and previous model, last profile, telemetry buffer fill, last contact: a JSON-ready dict."""
    data = DataDir(data_dir)
    if not data.root.is_dir():
        from edgekit.errors import InputError

        raise InputError(f"{data.root}: no agent data directory", "Pass the --data-dir the agent runs with.")
    record = data.load_state()
    identity = data.identity() or {}
    slots = Slots(data)
    try:
        ptr = slots.active()
    except EdgekitError:
        ptr = None
    prev_sha = slots.previous_sha() if data.models.is_dir() else None
    prev_info = slots.info(prev_sha) if prev_sha else None
    job = record.get("assignment") or None
    buffered, capacity, dropped = TelemetryBuffer(data.root).fill()
    return {
        "data_dir": str(data.root),
        "enrolled": bool(identity),
        "device_id": identity.get("device_id"),
        "name": identity.get("name"),
        "profile": identity.get("profile"),
        "server": identity.get("server"),
        "state": record.get("state", "idle"),
        "attempts": record.get("attempts", 0),
        "assignment": None if job is None else {k: job.get(k) for k in ("kind", "serial", "action", "name", "version", "sha256")},
        "last_serial": record.get("last_serial", 0),
        "active": {"name": ptr.name, "version": ptr.version, "sha256": ptr.sha256} if ptr else None,
        "previous": None if not prev_sha else {"name": (prev_info or {}).get("name"), "version": (prev_info or {}).get("version"),
                                                "sha256": prev_sha},
        "last_profile": record.get("last_profile"),
        "last_result": None if not record.get("last_result") else
        {k: record["last_result"].get(k) for k in ("kind", "serial", "action", "name", "version", "sha256", "failure", "finished_at")},
        "reports_queued": len(record.get("outbox") or []),
        "telemetry": {"buffered_points": buffered, "capacity": capacity, "fill": buffered / capacity if capacity else None,
                      "dropped_unreported": dropped},
        "last_contact": data.contact(),
        "trust": _trust(data, identity),
        "slots": sorted(({"sha256": s["sha256"], "name": s.get("name"), "version": s.get("version"), "blocked": s.get("blocked")}
                         for s in slots.list()), key=lambda s: s["sha256"]) if data.models.is_dir() else [],
    }


def _trust(data: DataDir, identity: dict) -> dict:
    """The server key this device follows and the publisher allow-list it holds (docs/security.md)."""
    from device_agents.trust import TrustStore

    try:
        stored = TrustStore(data).load()
    except EdgekitError:
        stored = {}
    pubs = stored.get("publishers") or {}
    return {"server_key_id": stored.get("key_id") or identity.get("key_id"), "rotation_sequence": stored.get("rotation_sequence", 0),
            "publishers_version": pubs.get("version"), "publishers": len(pubs.get("keys") or [])}

