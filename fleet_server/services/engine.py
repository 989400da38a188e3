"""The rollout engine: start waves, decide them by their device gates and (after a bake) field gates, revert failed waves.

Every state change goes through the lifecycle tables of ``edgekit.protocol`` (``services.lifecycle``).

Every step is one write transaction that re-reads the rollout (locked ``FOR UPDATE`` on
PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serializes writers) and is guarded by the wave's
state, so running it twice, concurrently or after a restart, changes nothing the second time.
The app runs ``step_all`` every ``engine_interval_s`` and ``evaluate`` after each report.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from edgekit.protocol import ACTIVE_ROLLOUT_STATES, next_wave_state
from fleet_server.context import AppContext
from fleet_server.db import utc, utcnow
from fleet_server.services.assignments import issue
from fleet_server.services.field_stats import FieldSums
from fleet_server.services.gates import bake_progress, evaluate_device_gates, evaluate_field_gates, field_gates_of, wave_field_sums
from fleet_server.services.lifecycle import move_rollout, move_wave
from fleet_server.tables import Assignment, Rollout, RolloutDevice, RolloutWave

__all__ = ["ACTIVE_STATES", "evaluate", "evaluate_gates", "evaluate_if_leader", "revert_devices", "start_wave", "step_all"]

ACTIVE_STATES = ACTIVE_ROLLOUT_STATES
OPEN_WAVES = ("running", "baking")
evaluate_gates = evaluate_device_gates  # the name tests and callers know

log = logging.getLogger("edgekit.fleet")


def start_wave(s: Session, ctx: AppContext, rollout: Rollout, index: int) -> bool:
    """Mark a pending wave running and write one install assignment per device, once."""
    now = utcnow()
    res = s.execute(update(RolloutWave).where(RolloutWave.rollout_id == rollout.id, RolloutWave.index == index, RolloutWave.state == "pending")
                    .values(state=next_wave_state("pending", "start"), started_at=now))
    if res.rowcount != 1:
        return False
    rds = s.execute(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.wave_index == index)
                    .order_by(RolloutDevice.order)).scalars().all()
    for rd in rds:
        issue(s, ctx, device_id=rd.device_id, rollout_id=rollout.id, action="install", model=rollout.model, version=rollout.version,
              artifact_id=rd.artifact_id)
    rollout.current_wave = index
    rollout.updated_at = now
    return True


def revert_devices(s: Session, ctx: AppContext, rollout: Rollout, rds: list[RolloutDevice], reason: str) -> int:
    """Tell each device that got this rollout's install to return to its previous artifact (once per device)."""
    installed = set(s.execute(select(Assignment.device_id).where(Assignment.rollout_id == rollout.id, Assignment.action == "install")).scalars())
    reverted = set(s.execute(select(Assignment.device_id).where(Assignment.rollout_id == rollout.id, Assignment.action == "revert")).scalars())
    n = 0
    for rd in rds:
        if rd.device_id in installed and rd.device_id not in reverted:
            issue(s, ctx, device_id=rd.device_id, rollout_id=rollout.id, action="revert", model=rollout.model, version=rollout.version,
                  artifact_id=rd.previous_artifact_id, reason=reason)
            n += 1
    return n


def _lock(s: Session, rollout_id: str) -> Rollout | None:
    return s.execute(select(Rollout).where(Rollout.id == rollout_id).with_for_update()).scalar_one_or_none()


def _fail_reason(w: RolloutWave, failed: list[dict[str, Any]]) -> str:
    g = failed[0]
    who = f" on device {g['device_id']}" if g["device_id"] else ""
    value = (g.get("note") or "unknown") if g["value"] is None else f"{g['value']:.4g}"
    return f"wave {w.index + 1}: gate {g['gate']} failed{who} (value {value}, limit {g['limit']})"


FieldData = tuple[FieldSums, FieldSums, str]


def _decide_wave(s: Session, ctx: AppContext, r: Rollout, w: RolloutWave, now: dt.datetime, field: FieldData | None) -> bool:
    """Move an open wave on: devices done → device gates → bake → field gates. Returns True when a gate failed."""
    if w.state == "baking":
        return _decide_bake(r, w, now, field)
    started = utc(w.started_at) or now
    if started + dt.timedelta(seconds=r.wave_timeout_s) <= now:
        s.execute(update(RolloutDevice).where(RolloutDevice.rollout_id == r.id, RolloutDevice.wave_index == w.index,
                                              RolloutDevice.finished.is_(False)).values(finished=True, reason="timeout"))
    rds = s.execute(select(RolloutDevice).where(RolloutDevice.rollout_id == r.id, RolloutDevice.wave_index == w.index)
                    .order_by(RolloutDevice.order).execution_options(populate_existing=True)).scalars().all()
    if not all(rd.finished for rd in rds):
        return False
    results = evaluate_device_gates(r.gates, rds)
    w.gate_results = results
    r.updated_at = now
    failed = [g for g in results if g["passed"] is False]
    if failed:
        move_wave(w, "gates_failed", now)
        r.reason = _fail_reason(w, failed)
        return True
    if field_gates_of(r.gates):
        move_wave(w, "devices_done", now)  # → baking: the field gates decide after the bake period
        w.bake_started_at = now
        return False
    move_wave(w, "gates_passed", now)
    return False


def _decide_bake(r: Rollout, w: RolloutWave, now: dt.datetime, field: FieldData | None) -> bool:
    """A baking wave: once the bake is over (or timed out), its field gates decide it."""
    if field is None:
        return False
    new, ref, how = field
    bake_started = utc(w.bake_started_at) or now
    done = bake_progress(r.gates, bake_started, now, new.requests)
    timed_out = bake_started + dt.timedelta(seconds=r.wave_timeout_s) <= now
    if not done and not timed_out:
        return False
    results = list(w.gate_results or []) + evaluate_field_gates(r.gates, new, ref, how, enough=done)
    w.gate_results = results
    r.updated_at = now
    failed = [g for g in results if g["passed"] is False]
    move_wave(w, "gates_failed" if failed else "gates_passed", now)
    if failed:
        r.reason = _fail_reason(w, failed)
    return bool(failed)


FIELD_CHECK_S = 5.0  # a baking wave's telemetry is aggregated at most this often per rollout (and only once bake_s is over)
_field_checked: dict[str, float] = {}


def _field_data(ctx: AppContext, rollout_id: str) -> dict[int, FieldData]:
    """Field sums of each baking wave whose bake time is over, read before the write transaction (aggregating
    telemetry holds no write lock), at most every FIELD_CHECK_S seconds per rollout."""
    out: dict[int, FieldData] = {}
    if time.monotonic() - _field_checked.get(rollout_id, -1e9) < FIELD_CHECK_S:
        return out
    with ctx.db.read() as s:
        r = s.get(Rollout, rollout_id)
        waves = s.execute(select(RolloutWave).where(RolloutWave.rollout_id == rollout_id, RolloutWave.state == "baking")).scalars().all()
        now = utcnow()
        gates = (r.gates or {}) if r is not None else {}
        bake_s = float(gates["bake_s"]) if gates.get("bake_s") is not None else 0.0 if gates.get("bake_requests") is not None else 60.0
        for w in waves:
            started = utc(w.bake_started_at) or now
            timed_out = r is not None and started + dt.timedelta(seconds=r.wave_timeout_s) <= now
            if (now - started).total_seconds() < bake_s and not timed_out:
                continue  # nothing to decide before the bake time is over: no telemetry read
            _field_checked[rollout_id] = time.monotonic()
            rds = s.execute(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id, RolloutDevice.wave_index == w.index)).scalars().all()
            since = (utc(w.started_at) or now).replace(second=0, microsecond=0)
            out[w.index] = wave_field_sums(s, rollout_id, w.index, list(rds), since, now + dt.timedelta(minutes=1))
    return out


def _may_move(ctx: AppContext, rollout_id: str) -> bool:
    """A read-only look: could a step change anything? Most ticks find nothing, and take no write lock."""
    with ctx.db.read() as s:
        r = s.execute(select(Rollout.state, Rollout.wave_timeout_s).where(Rollout.id == rollout_id)).first()
        if r is None or r.state not in ACTIVE_STATES:
            return False
        waves = s.execute(select(RolloutWave.index, RolloutWave.state, RolloutWave.started_at).where(RolloutWave.rollout_id == rollout_id)).all()
        running = [w for w in waves if w.state == "running"]
        baking = [w for w in waves if w.state == "baking"]
        if not running and not baking:
            return r.state == "running"
        if baking:
            return True  # the bake decides on time and field telemetry (read outside the write lock)
        now = utcnow()
        for w in running:
            if (utc(w.started_at) or now) + dt.timedelta(seconds=r.wave_timeout_s) <= now:
                return True
            unfinished = s.execute(select(RolloutDevice.id).where(RolloutDevice.rollout_id == rollout_id, RolloutDevice.wave_index == w.index,
                                                                  RolloutDevice.finished.is_(False)).limit(1)).first()
            if unfinished is None:
                return True
        return False


def evaluate(ctx: AppContext, rollout_id: str) -> None:
    """One engine step for one rollout: decide open waves, then start the next or finish."""
    if not _may_move(ctx, rollout_id):
        return
    field = _field_data(ctx, rollout_id)
    with ctx.db.write() as s:
        r = _lock(s, rollout_id)
        if r is None or r.state not in ACTIVE_STATES:
            return
        now = utcnow()
        waves = s.execute(select(RolloutWave).where(RolloutWave.rollout_id == r.id).order_by(RolloutWave.index)).scalars().all()
        failed_wave = None
        for w in waves:
            if w.state in OPEN_WAVES and _decide_wave(s, ctx, r, w, now, field.get(w.index)):
                failed_wave = w
                break
        if failed_wave is not None:
            open_waves = [w for w in waves if w.state in OPEN_WAVES or w is failed_wave]
            for w in open_waves:
                if w is not failed_wave:
                    move_wave(w, "rollback", now)
            rds = s.execute(select(RolloutDevice).where(RolloutDevice.rollout_id == r.id,
                                                        RolloutDevice.wave_index.in_([w.index for w in open_waves]))).scalars().all()
            revert_devices(s, ctx, r, list(rds), "gate_failed")
            move_rollout(r, "gate_failed", now)
            return
        if r.state != "running" or any(w.state in OPEN_WAVES for w in waves):
            return
        pending = [w for w in waves if w.state == "pending"]
        if pending:
            start_wave(s, ctx, r, pending[0].index)
        elif all(w.state == "passed" for w in waves):
            move_rollout(r, "all_passed", now)


def evaluate_if_leader(ctx: AppContext, rollout_id: str) -> None:
    """``evaluate`` in the replica that runs the engine (fleet_server.leadership); the others leave it to the leader's next tick."""
    if ctx.leadership.holds():
        evaluate(ctx, rollout_id)


def step_all(ctx: AppContext) -> None:
    """One engine step for every running or paused rollout; one that fails is logged and never holds up the others.

    Only the replica holding the engine's leadership steps (``ctx.leadership``; always true on SQLite).
    """
    if not ctx.leadership.acquire():
        return
    with ctx.db.read() as s:
        ids = list(s.execute(select(Rollout.id).where(Rollout.state.in_(ACTIVE_STATES))).scalars())
    for rollout_id in ids:
        try:
            evaluate(ctx, rollout_id)
        except Exception:  # noqa: BLE001 - isolate rollouts: log this one, step the rest, retry it next tick
            log.exception("rollout engine step failed for rollout %s; retrying next tick", rollout_id)
