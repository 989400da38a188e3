"""Telemetry: per-minute batches from devices, read back by admins."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, insert, select

from fleet_server.context import AppContext
from fleet_server.db import utc, utcnow
from fleet_server.schemas import TelemetryBatch
from fleet_server.tables import Model, ModelVersion, TelemetryDrop, TelemetryPoint, VersionArtifact

__all__ = ["query_telemetry", "store_batch"]


def store_batch(ctx: AppContext, device_id: str, batch: TelemetryBatch) -> dict[str, Any]:
    """Insert every point of a batch (one statement) and the device's dropped count."""
    ctx.last_seen.touch(device_id)
    now = utcnow()
    rows = [{"device_id": device_id, "minute": p.minute, "model_sha256": p.model_sha256, "model_version": p.model_version,
             "data": p.model_dump(mode="json", exclude={"minute", "model_sha256", "model_version"}), "received_at": now}
            for p in batch.points]
    with ctx.db.write() as s:
        if rows:
            s.execute(insert(TelemetryPoint), rows)
        if batch.dropped:
            s.add(TelemetryDrop(device_id=device_id, dropped=batch.dropped, received_at=now))
    return {"accepted": len(rows)}


def query_telemetry(ctx: AppContext, device_id: str | None, model: str | None, since: dt.datetime | None, limit: int) -> dict[str, Any]:
    """Points, newest first, filtered by device, model name and time; plus the dropped total."""
    with ctx.db.read() as s:
        q = select(TelemetryPoint).order_by(TelemetryPoint.minute.desc(), TelemetryPoint.id.desc()).limit(limit)
        dq = select(func.coalesce(func.sum(TelemetryDrop.dropped), 0))
        if device_id:
            q = q.where(TelemetryPoint.device_id == device_id)
            dq = dq.where(TelemetryDrop.device_id == device_id)
        if since is not None:
            q = q.where(TelemetryPoint.minute >= since)
            dq = dq.where(TelemetryDrop.received_at >= since)
        if model:
            shas = select(VersionArtifact.artifact_sha256).join(ModelVersion, ModelVersion.id == VersionArtifact.version_id) \
                .join(Model, Model.id == ModelVersion.model_id).where(Model.name == model)
            q = q.where(TelemetryPoint.model_sha256.in_(shas))
        points = s.execute(q).scalars().all()
        dropped = int(s.execute(dq).scalar_one())
    return {"points": [{"device_id": p.device_id, "minute": utc(p.minute).strftime("%Y-%m-%dT%H:%M:%SZ"), "model_sha256": p.model_sha256,
                        "model_version": p.model_version, **p.data} for p in points], "dropped": dropped}
