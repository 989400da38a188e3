"""Telemetry: per-minute batches from devices, read back by admins."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select

from fleet_server.context import AppContext
from fleet_server.db import utc
from fleet_server.schemas import TelemetryBatch
from fleet_server.tables import Model, ModelVersion, TelemetryDrop, TelemetryPoint, VersionArtifact

__all__ = ["query_telemetry", "store_batch"]


async def store_batch(ctx: AppContext, device_id: str, batch: TelemetryBatch) -> dict[str, Any]:
    """Queue a batch for the group-commit writer (fleet_server.writer) and wait for its commit.

    Runs on the event loop; 503 (Unavailable) at once when the writer's queue is full.
    """
    ctx.last_seen.touch(device_id)
    assert ctx.telemetry is not None, "the telemetry writer starts in the app's lifespan"
    return {"accepted": await ctx.telemetry.submit(device_id, batch)}


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
