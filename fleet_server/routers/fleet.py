"""Admin: devices and telemetry."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query

from fleet_server.deps import AdminDep, CtxDep
from fleet_server.responses import DevicePublic, TelemetryPage
from fleet_server.services import devices, telemetry
from fleet_server.hardening import IsoDateTime

router = APIRouter(tags=["fleet"])


@router.get("/v1/devices", response_model=list[DevicePublic])
def list_devices(ctx: CtxDep, _: AdminDep, profile: str | None = None, tag: str | None = None) -> list[dict]:
    """Enrolled devices, optionally of one profile or carrying one tag."""
    return devices.list_devices(ctx, profile, tag)


@router.get("/v1/devices/{device_id}", response_model=DevicePublic)
def get_device(device_id: str, ctx: CtxDep, _: AdminDep) -> dict:
    """One device."""
    return devices.get_device(ctx, device_id)


@router.get("/v1/telemetry", response_model=TelemetryPage)
def get_telemetry(ctx: CtxDep, _: AdminDep, device_id: str | None = None, model: str | None = None, since: IsoDateTime | None = None,
                  limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> dict:
    """Telemetry points, newest first, and the total the devices had to drop."""
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.timezone.utc)
    return telemetry.query_telemetry(ctx, device_id, model, since, limit)
