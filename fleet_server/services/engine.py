"""The rollout engine: start waves, decide them by their gates, revert failed waves.

Every step is one write transaction that re-reads the rollout (locked ``FOR UPDATE`` on
PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serializes writers) and is guarded by the wave's
state, so running it twice, concurrently or after a restart, changes nothing the second time.
The app runs ``step_all`` every ``engine_interval_s`` and ``evaluate`` after each report.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fleet_server.context import AppContext
from fleet_server.db import utc, utcnow
from fleet_server.services.assignments import issue
from fleet_server.tables import Assignment, Rollout, RolloutDevice, RolloutWave

__all__ = ["ACTIVE_STATES", "evaluate", "evaluate_gates", "revert_devices", "start_wave", "step_all"]

ACTIVE_STATES = ("running", "paused")
_EPS = 1e-9

log = logging.getLogger("edgekit.fleet")


def start_wave(s: Session, ctx: AppContext, rollout: Rollout, index: int) -> bool:
    """Mark a pending wave running and write one install assignment per device, once."""
    now = utcnow()
    res = s.execute(update(RolloutWave).where(RolloutWave.rollout_id == rollout.id, RolloutWave.index == index, RolloutWave.state == "pending")
                    .values(state="running", started_at=now))
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


def _failed(rd: RolloutDevice) -> bool:
    return rd.finished and rd.phase != "activated"


def _result(gate: str, limit: float, value: float, passed: bool, device_id: str | None) -> dict[str, Any]:
    """One gate result; a value that is not a finite number (e.g. a ratio that overflowed) fails with value null."""
    if not math.isfinite(value):
        return {"gate": gate, "limit": limit, "value": None, "passed": False, "device_id": device_id}
    return {"gate": gate, "limit": limit, "value": value, "passed": passed, "device_id": device_id}


def _ratio(num: float, den: float) -> float:
    try:
        return num / den
    except (OverflowError, ZeroDivisionError):
        return math.inf


def evaluate_gates(gates: dict[str, Any], rds: list[RolloutDevice]) -> list[dict[str, Any]]:
    """Every configured gate's result on one finished wave (per device where the gate is per device)."""
    results: list[dict[str, Any]] = []
    limit = gates.get("max_failure_rate")
    if limit is not None:
        rate = sum(_failed(rd) for rd in rds) / len(rds) if rds else 0.0
        results.append(_result("max_failure_rate", limit, rate, rate <= limit + _EPS, None))
    for rd in rds:
        m = rd.metrics or {}
        if (limit := gates.get("min_agreement")) is not None and m.get("golden_top1_agreement") is not None:
            v = float(m["golden_top1_agreement"])
            results.append(_result("min_agreement", limit, v, v >= limit - _EPS, rd.device_id))
        base = (m.get("baseline") or {}).get("p95_ms")
        if (limit := gates.get("max_p95_ratio")) is not None and m.get("p95_ms") is not None and base:
            v = _ratio(float(m["p95_ms"]), float(base))
            results.append(_result("max_p95_ratio", limit, v, v <= limit + _EPS, rd.device_id))
        if (limit := gates.get("max_peak_rss_mb")) is not None and m.get("peak_rss_mb") is not None:
            v = float(m["peak_rss_mb"])
            results.append(_result("max_peak_rss_mb", limit, v, v <= limit + _EPS, rd.device_id))
    return results


def _lock(s: Session, rollout_id: str) -> Rollout | None:
    return s.execute(select(Rollout).where(Rollout.id == rollout_id).with_for_update()).scalar_one_or_none()


def _decide_wave(s: Session, ctx: AppContext, r: Rollout, w: RolloutWave, now: dt.datetime) -> bool:
    """Finish a running wave if it is done or timed out; returns True when its gates failed."""
    started = utc(w.started_at) or now
    if started + dt.timedelta(seconds=r.wave_timeout_s) <= now:
        s.execute(update(RolloutDevice).where(RolloutDevice.rollout_id == r.id, RolloutDevice.wave_index == w.index,
                                              RolloutDevice.finished.is_(False)).values(finished=True, reason="timeout"))
    rds = s.execute(select(RolloutDevice).where(RolloutDevice.rollout_id == r.id, RolloutDevice.wave_index == w.index)
                    .order_by(RolloutDevice.order).execution_options(populate_existing=True)).scalars().all()
    if not all(rd.finished for rd in rds):
        return False
    results = evaluate_gates(r.gates, rds)
    w.gate_results = results
    w.finished_at = now
    failed = [g for g in results if not g["passed"]]
    w.state = "failed" if failed else "passed"
    if failed:
        g = failed[0]
        who = f" on device {g['device_id']}" if g["device_id"] else ""
        value = "not a finite number" if g["value"] is None else f"{g['value']:.4g}"
        r.reason = f"wave {w.index + 1}: gate {g['gate']} failed{who} (value {value}, limit {g['limit']})"
    r.updated_at = now
    return bool(failed)


def _may_move(ctx: AppContext, rollout_id: str) -> bool:
    """A read-only look: could a step change anything? Most ticks find nothing, and take no write lock."""
    with ctx.db.read() as s:
        r = s.execute(select(Rollout.state, Rollout.wave_timeout_s).where(Rollout.id == rollout_id)).first()
        if r is None or r.state not in ACTIVE_STATES:
            return False
        waves = s.execute(select(RolloutWave.index, RolloutWave.state, RolloutWave.started_at).where(RolloutWave.rollout_id == rollout_id)).all()
        running = [w for w in waves if w.state == "running"]
        if not running:
            return r.state == "running"
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
    """One engine step for one rollout: decide running waves, then start the next or finish."""
    if not _may_move(ctx, rollout_id):
        return
    with ctx.db.write() as s:
        r = _lock(s, rollout_id)
        if r is None or r.state not in ACTIVE_STATES:
            return
        now = utcnow()
        waves = s.execute(select(RolloutWave).where(RolloutWave.rollout_id == r.id).order_by(RolloutWave.index)).scalars().all()
        failed_wave = None
        for w in waves:
            if w.state == "running" and _decide_wave(s, ctx, r, w, now):
                failed_wave = w
                break
        if failed_wave is not None:
            running = [w for w in waves if w.state == "running" or w is failed_wave]
            for w in running:
                if w is not failed_wave:
                    w.state = "rolled_back"
                    w.finished_at = now
            rds = s.execute(select(RolloutDevice).where(RolloutDevice.rollout_id == r.id,
                                                        RolloutDevice.wave_index.in_([w.index for w in running]))).scalars().all()
            revert_devices(s, ctx, r, list(rds), "gate_failed")
            r.state = "failed"
            return
        if r.state != "running" or any(w.state == "running" for w in waves):
            return
        pending = [w for w in waves if w.state == "pending"]
        if pending:
            start_wave(s, ctx, r, pending[0].index)
        elif all(w.state == "passed" for w in waves):
            r.state = "completed"
            r.updated_at = now


def step_all(ctx: AppContext) -> None:
    """One engine step for every running or paused rollout; one that fails is logged and never holds up the others."""
    with ctx.db.read() as s:
        ids = list(s.execute(select(Rollout.id).where(Rollout.state.in_(ACTIVE_STATES))).scalars())
    for rollout_id in ids:
        try:
            evaluate(ctx, rollout_id)
        except Exception:  # noqa: BLE001 - isolate rollouts: log this one, step the rest, retry it next tick
            log.exception("rollout engine step failed for rollout %s; retrying next tick", rollout_id)
