"""``edgekit agent install``: the verify → profile → activate path for one local bundle, no server."""

from __future__ import annotations

import os
from pathlib import Path

from edgekit.archive import refuse_links
from edgekit.bundle import sha256_file
from edgekit.errors import BundleError, UsageError

from device_agents.lock import DirLock
from device_agents.machine import Event, State
from device_agents.settings import AgentSettings
from device_agents.steps import open_runner
from device_agents.store import DataDir
from device_agents.trust import TrustStore

__all__ = ["install_local"]


def install_local(data_dir: str | os.PathLike[str], source: str | os.PathLike[str], settings: AgentSettings,
                  *, lock_timeout_s: float = 600.0) -> dict:
    """Install one bundle directory or ``.ekb``; the result as a JSON-ready dict (``ok`` False on a refusal)."""
    src = Path(source).resolve()
    if not src.exists():
        raise BundleError(f"{src}: no such bundle", "Pass a bundle directory or a .ekb file.")
    data = DataDir(data_dir)
    if not settings.trusted_keys and not settings.insecure_any_publisher and TrustStore(data).publisher_keys() is None:
        raise UsageError("no trusted publisher key: an offline install must know whose bundles to run",
                         "Pass --trusted-key KEY (the base64 key 'edgekit bundle key' prints, or a key file), or set "
                         "EDGEKIT_AGENT_TRUSTED_KEYS; --insecure-any-publisher skips the check (never on a production device).")
    if src.is_dir():
        refuse_links(src)  # before hashing the directory: a link is never followed, not even to name the slot
    data.ensure()
    with DirLock(data.root / ".job.lock").held(lock_timeout_s, "the agent (working on an assignment)"):
        identity = data.identity()
        if identity and settings.profile and identity.get("profile") != settings.profile:
            raise UsageError(f"this device enrolled as {identity.get('profile')}, not {settings.profile}", "Drop --profile.")
        settings = settings.for_profile((identity or {}).get("profile") or settings.profile)
        runner = open_runner(data, settings, identity=identity)
        resumed = None
        if runner.state is not State.IDLE:
            job = runner.ctx.record.get("assignment") or {}
            if job.get("kind") == "fleet":
                raise UsageError(f"a fleet assignment is in progress (state {runner.state})",
                                 "Let 'edgekit agent run' finish it, then install.")
            runner.run_until_idle()  # an interrupted local install: finish (or roll back) it first
            resumed = runner.ctx.record["last_result"]
        slots = runner.ctx.slots
        before = {"sha256": slots.active_sha(), "previous": slots.previous_sha()}
        sha = sha256_file(src)
        runner.start(Event.LOCAL_INSTALL, {"kind": "local", "source": str(src), "sha256": sha, "before": before})
        runner.run_until_idle()
        result = runner.ctx.record["last_result"]
        ptr = slots.active()
        profile = (runner.ctx.record.get("last_profile") or {})
        return {
            "ok": result.get("failure") is None,
            "source": str(src),
            "sha256": sha,
            "name": result.get("name"),
            "version": result.get("version"),
            "failure": result.get("failure"),
            "profile": profile.get("metrics") if profile.get("sha256") == sha else None,
            "active": {"sha256": ptr.sha256, "name": ptr.name, "version": ptr.version} if ptr else None,
            "previous": before["sha256"],
            "phases": [r["phase"] for r in result.get("reports") or []],
            "transitions": result.get("transitions"),
            "resumed": None if resumed is None else {k: resumed.get(k) for k in ("sha256", "version", "failure", "transitions")},
        }
