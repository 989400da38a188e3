"""Rollouts: creation (selector → devices → waves), the admin's view, and the admin's actions."""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from edgekit.profiles import list_profiles
from fleet_server.context import AppContext
from fleet_server.db import utc, utcnow
from fleet_server.errors import BadRequest, Conflict, NotFound
from fleet_server.schemas import RolloutCreate
from fleet_server.services.engine import ACTIVE_STATES, evaluate, revert_devices, start_wave
from fleet_server.services.lifecycle import admin_move, move_wave, wave_may
from fleet_server.services.registry import version_row
from fleet_server.tables import Device, Rollout, RolloutDevice, RolloutWave, VersionArtifact

__all__ = ["create_rollout", "get_rollout", "pause", "promote", "resume", "rollback", "split_waves"]

log = logging.getLogger("edgekit.fleet")


def split_waves(n: int, waves: list[float]) -> list[tuple[float, int]]:
    """(percent, devices up to) per wave: ceil(pct × n / 100), at least one new device while any remain."""
    out: list[tuple[float, int]] = []
    prev = 0
    for pct in waves:
        if prev >= n:
            break
        upto = min(n, max(math.ceil(pct * n / 100 - 1e-9), prev + 1))
        out.append((pct, upto))
        prev = upto
    return out


def _pick_artifacts(session: Session, version_id: int) -> dict[str, VersionArtifact]:
    """The artifact each profile gets: the profile's first supported format that the version has."""
    by_profile: dict[str, list[VersionArtifact]] = {}
    for va in session.execute(select(VersionArtifact).where(VersionArtifact.version_id == version_id)).scalars():
        by_profile.setdefault(va.profile, []).append(va)
    profiles = list_profiles()
    chosen: dict[str, VersionArtifact] = {}
    for profile, vas in by_profile.items():
        order = list(profiles[profile][0].formats.supported()) if profile in profiles else []
        vas.sort(key=lambda va: order.index(va.format) if va.format in order else len(order))
        chosen[profile] = vas[0]
    return chosen


def stored_gates(req: RolloutCreate) -> dict[str, Any]:
    """The gates the engine checks (safe defaults unless opted out) and the bake settings, as stored with the rollout."""
    gates: dict[str, Any] = dict(req.gates.effective())
    for key in ("bake_s", "bake_requests"):
        if getattr(req.gates, key) is not None:
            gates[key] = getattr(req.gates, key)
    return gates


def create_rollout(ctx: AppContext, req: RolloutCreate) -> dict[str, Any]:
    """Resolve the selector, split the devices into waves and start the first, in one transaction."""
    with ctx.db.write() as s:
        mv = version_row(s, req.model, req.version)
        if mv is None:
            raise NotFound(f"no version '{req.version}' of model '{req.model}'", "Upload it first (POST /v1/models/{name}/versions).")
        q = select(Device).where(Device.decommissioned_at.is_(None)).order_by(Device.id)
        if req.selector.profiles:
            q = q.where(Device.profile.in_(req.selector.profiles))
        wanted = set(req.selector.tags)
        matched = [d for d in s.execute(q).scalars() if wanted <= set(d.tags)]
        if not matched:
            raise BadRequest(f"no enrolled device matches the selector (profiles {req.selector.profiles or 'any'}, tags {req.selector.tags or 'none'})",
                             "Check GET /v1/devices, or widen the selector.", code="no_matching_devices")
        artifacts = _pick_artifacts(s, mv.id)
        targets = [d for d in matched if d.profile in artifacts]
        skipped = [{"device_id": d.id, "name": d.name, "profile": d.profile, "reason": f"version has no artifact for profile '{d.profile}'"}
                   for d in matched if d.profile not in artifacts]
        if not targets:
            raise BadRequest(f"{len(matched)} device(s) match, but version '{req.version}' has no artifact for their profiles "
                             f"({', '.join(sorted({d.profile for d in matched}))})",
                             f"The version has artifacts for: {', '.join(sorted(artifacts)) or 'none'}.", code="no_matching_devices")
        busy = dict(s.execute(select(RolloutDevice.device_id, RolloutDevice.rollout_id).join(Rollout, Rollout.id == RolloutDevice.rollout_id)
                              .where(Rollout.state.in_(ACTIVE_STATES))).all())  # no IN list: fleets outgrow SQLite's parameter limit
        clash = next((d for d in targets if d.id in busy), None)
        if clash is not None:
            raise Conflict(f"device {clash.id} ({clash.name}) is in running rollout {busy[clash.id]}",
                           "Wait for it to finish, or pause/rollback it first.")
        now = utcnow()
        rollout_id = "ro_" + secrets.token_hex(8)
        targets.sort(key=lambda d: hashlib.sha256((rollout_id + d.id).encode()).hexdigest())
        r = Rollout(id=rollout_id, version_id=mv.id, model=req.model, version=req.version, state="running",
                    selector=req.selector.model_dump(), waves_pct=req.waves, gates=stored_gates(req),
                    wave_timeout_s=req.wave_timeout_s, current_wave=0, created_at=now, updated_at=now, reason=None, skipped=skipped)
        s.add(r)
        s.flush()
        prev = 0
        for i, (pct, upto) in enumerate(split_waves(len(targets), req.waves)):
            s.add(RolloutWave(rollout_id=rollout_id, index=i, percent=pct, state="pending", gate_results=[]))
            for order in range(prev, upto):
                d = targets[order]
                s.add(RolloutDevice(rollout_id=rollout_id, device_id=d.id, wave_index=i, order=order, artifact_id=artifacts[d.profile].id,
                                    previous_artifact_id=d.active_artifact_id, finished=False))
            prev = upto
        s.flush()
        start_wave(s, ctx, r, 0)
    return get_rollout(ctx, rollout_id)


def get_rollout(ctx: AppContext, rollout_id: str) -> dict[str, Any]:
    """A rollout with its waves, their devices and gate results."""
    with ctx.db.read() as s:
        r = s.get(Rollout, rollout_id)
        if r is None:
            raise NotFound(f"no rollout '{rollout_id}'", "Rollout ids are returned by POST /v1/rollouts.")
        waves = s.execute(select(RolloutWave).where(RolloutWave.rollout_id == r.id).order_by(RolloutWave.index)).scalars().all()
        rows = s.execute(select(RolloutDevice, Device.name, Device.profile).join(Device, Device.id == RolloutDevice.device_id)
                         .where(RolloutDevice.rollout_id == r.id).order_by(RolloutDevice.order)).all()
    by_wave: dict[int, list[dict[str, Any]]] = {}
    for rd, name, profile in rows:
        by_wave.setdefault(rd.wave_index, []).append({"device_id": rd.device_id, "name": name, "profile": profile, "phase": rd.phase,
                                                      "finished": rd.finished, "metrics": rd.metrics, "reason": rd.reason})
    return {
        "id": r.id, "model": r.model, "version": r.version, "state": r.state, "selector": r.selector, "waves_pct": r.waves_pct,
        "gates": r.gates, "wave_timeout_s": r.wave_timeout_s, "current_wave": r.current_wave, "created_at": utc(r.created_at),
        "updated_at": utc(r.updated_at), "reason": r.reason, "skipped": {"count": len(r.skipped), "devices": r.skipped},
        "waves": [{"index": w.index, "percent": w.percent, "state": w.state, "started_at": utc(w.started_at), "finished_at": utc(w.finished_at),
                   "bake_started_at": utc(w.bake_started_at),
                   "devices": by_wave.get(w.index, []), "gate_results": w.gate_results} for w in waves],
    }


def _transition(ctx: AppContext, rollout_id: str, action: str, then=None) -> dict[str, Any]:  # noqa: ANN001
    """An admin action: the lifecycle table moves the rollout (409 where it has no row), ``then`` does the action's work."""
    with ctx.db.write() as s:
        r = s.execute(select(Rollout).where(Rollout.id == rollout_id).with_for_update()).scalar_one_or_none()
        if r is None:
            raise NotFound(f"no rollout '{rollout_id}'", "Rollout ids are returned by POST /v1/rollouts.")
        admin_move(r, action, utcnow())
        if then is not None:
            then(s, r)
    try:
        evaluate(ctx, rollout_id)
    except Exception:  # noqa: BLE001 - the transition is committed; the engine loop retries the step (and logs it)
        log.exception("rollout step after '%s' of rollout %s failed; the engine loop will retry", action, rollout_id)
    return get_rollout(ctx, rollout_id)


def pause(ctx: AppContext, rollout_id: str) -> dict[str, Any]:
    """No new wave starts; issued assignments stand and the running wave is still decided."""
    return _transition(ctx, rollout_id, "pause")


def resume(ctx: AppContext, rollout_id: str) -> dict[str, Any]:
    """Continue a paused rollout."""
    return _transition(ctx, rollout_id, "resume")


def _promote(s: Session, ctx: AppContext, r: Rollout) -> None:
    pending = s.execute(select(RolloutWave).where(RolloutWave.rollout_id == r.id, RolloutWave.state == "pending")
                        .order_by(RolloutWave.index)).scalars().all()
    if not pending:
        return
    first, rest = pending[0], pending[1:]
    if rest:
        s.execute(update(RolloutDevice).where(RolloutDevice.rollout_id == r.id, RolloutDevice.wave_index.in_([w.index for w in rest]))
                  .values(wave_index=first.index))
        s.execute(delete(RolloutWave).where(RolloutWave.id.in_([w.id for w in rest])))
    first.percent = 100.0
    s.flush()
    start_wave(s, ctx, r, first.index)


def promote(ctx: AppContext, rollout_id: str) -> dict[str, Any]:
    """Every remaining device gets the version now, as one last wave whose gates are still recorded."""
    return _transition(ctx, rollout_id, "promote", lambda s, r: _promote(s, ctx, r))


def _rollback(s: Session, ctx: AppContext, r: Rollout) -> None:
    r.reason = "rolled back by an admin"
    now = utcnow()
    waves = s.execute(select(RolloutWave).where(RolloutWave.rollout_id == r.id)).scalars().all()
    for w in waves:
        if wave_may(w, "rollback"):
            move_wave(w, "rollback", now)
    rds = s.execute(select(RolloutDevice).where(RolloutDevice.rollout_id == r.id).order_by(RolloutDevice.order)).scalars().all()
    revert_devices(s, ctx, r, list(rds), "server_rollback")


def rollback(ctx: AppContext, rollout_id: str) -> dict[str, Any]:
    """Every device this rollout gave the version returns to its previous version."""
    return _transition(ctx, rollout_id, "rollback", lambda s, r: _rollback(s, ctx, r))
