"""Device reports: idempotent on (device, rollout, phase); they move the device and its wave along."""

from __future__ import annotations

import logging
import math
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from fleet_server.context import AppContext
from fleet_server.db import utcnow
from fleet_server.errors import Forbidden
from fleet_server.schemas import TERMINAL_PHASES, ProfiledMetrics, ReportRequest
from fleet_server.services.engine import evaluate_if_leader
from fleet_server.tables import Assignment, Device, Report, RolloutDevice

__all__ = ["record_report"]

log = logging.getLogger("edgekit.fleet")

_DUPLICATE = {"accepted": False, "duplicate": True}


def finite(value: Any) -> Any:
    """The value with NaN and ±Infinity replaced by None (JSON columns, PostgreSQL's above all, refuse them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def record_report(ctx: AppContext, device_id: str, req: ReportRequest) -> dict[str, Any]:
    """Store a report once and apply it; a repeat changes nothing."""
    ctx.last_seen.touch(device_id)
    metrics = ProfiledMetrics.model_validate(req.metrics).model_dump(exclude_none=True) if req.phase == "profiled" else req.metrics
    metrics = finite(metrics)
    try:
        with ctx.db.write() as s:
            a = s.execute(select(Assignment.rollout_id, Assignment.action, Assignment.artifact_id)
                          .where(Assignment.device_id == device_id, Assignment.serial == req.serial)).first()
            if a is None:
                raise Forbidden(f"serial {req.serial} is not an assignment of this device", "Report on an assignment you received from /v1/device/desired.")
            exists = s.execute(select(Report.id).where(Report.device_id == device_id, Report.rollout_id == a.rollout_id,
                                                       Report.phase == req.phase)).first()
            if exists is not None:
                return _DUPLICATE
            s.add(Report(device_id=device_id, rollout_id=a.rollout_id, serial=req.serial, phase=req.phase, reason=req.reason,
                         metrics=metrics, created_at=utcnow()))
            s.flush()
            device_values: dict[str, Any] = {"phase": req.phase}
            if a.action == "install":
                values: dict[str, Any] = {"phase": req.phase}
                if req.phase == "profiled":
                    values["metrics"] = metrics
                if req.phase in TERMINAL_PHASES:
                    values["finished"] = True
                    values["reason"] = req.reason
                s.execute(update(RolloutDevice).where(RolloutDevice.rollout_id == a.rollout_id, RolloutDevice.device_id == device_id,
                                                      RolloutDevice.finished.is_(False)).values(**values))
                if req.phase == "activated":
                    device_values["active_artifact_id"] = a.artifact_id
            elif a.action == "revert" and req.phase == "rolled_back":
                device_values["active_artifact_id"] = a.artifact_id
            s.execute(update(Device).where(Device.id == device_id).values(**device_values))
    except IntegrityError:  # a concurrent copy of this report won the unique constraint
        return _DUPLICATE
    try:
        evaluate_if_leader(ctx, a.rollout_id)
    except Exception:  # noqa: BLE001 - the report is stored; the engine loop takes the step on its next tick
        log.exception("rollout step after a report failed; the engine loop will retry")
    return {"accepted": True, "duplicate": False}
