"""Devices: enrollment, the desired-state hot path, and the admin's view of the fleet."""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgekit.profiles import list_profiles
from fleet_server.context import AppContext
from fleet_server.db import utc, utcnow
from fleet_server.errors import BadRequest, Conflict, NotFound
from fleet_server.schemas import EnrollRequest
from fleet_server.services.assignments import reissue_if_stale
from fleet_server.services.reports import finite
from fleet_server.tables import Device, Model, ModelVersion, Report, Rollout, VersionArtifact
from fleet_server.tokens import create_token

__all__ = ["Desired", "enroll", "get_device", "list_devices", "read_desired", "refresh_desired"]


def enroll(ctx: AppContext, req: EnrollRequest) -> dict[str, Any]:
    """Register a device and issue its token (returned once)."""
    profiles = list_profiles()
    if req.profile not in profiles:
        raise BadRequest(f"unknown hardware profile '{req.profile}'", f"Valid ids: {', '.join(profiles)}.", code="unknown_profile")
    device_id = "dev_" + secrets.token_hex(8)
    try:
        with ctx.db.write() as s:
            if s.execute(select(Device.id).where(Device.name == req.name)).first() is not None:
                raise Conflict(f"a device named '{req.name}' is enrolled already", "Pick another name; a device enrolls once.")
            s.add(Device(id=device_id, name=req.name, profile=req.profile, tags=sorted(set(req.tags)), facts=finite(req.facts),
                         enrolled_at=utcnow(), serial=0, desired_serial=0))
            s.flush()
            token = create_token(s, "device", device_id=device_id, label=req.name)
    except IntegrityError:
        raise Conflict(f"a device named '{req.name}' is enrolled already", "Pick another name; a device enrolls once.") from None
    return {"device_id": device_id, "device_token": token, "server_public_key": ctx.key.public_key, "key_id": ctx.key.key_id,
            "poll_interval_s": ctx.settings.poll_interval_s}


_DESIRED = select(Device.desired_serial, Device.desired_body, Device.desired_issued_at).where(Device.id == bindparam("id"))


@dataclass(frozen=True)
class Desired:
    """A device's desired state: its ETag and the ready-made JSON body."""

    etag: str
    body: bytes
    serial: int


def read_desired(ctx: AppContext, device_id: str, *, on_loop: bool = False) -> tuple[Desired, bool]:
    """The device's desired state from one primary-key read, and whether it is due for re-issue.

    No write and no lock wait (a WAL read), so on SQLite the route runs it on the event loop
    (``on_loop``: through the connection reserved for the loop, never a wait for the pool).
    """
    ctx.last_seen.touch(device_id)
    with (ctx.db.connect_on_loop() if on_loop else ctx.db.connect()) as c:
        row = c.execute(_DESIRED, {"id": device_id}).first()
    if row is None:
        raise NotFound("this device is not enrolled any more", "Enroll the device again.")
    serial, body, issued = row
    stale = body is not None and issued is not None and utc(issued) + dt.timedelta(seconds=ctx.settings.assignment_ttl_s / 2) < utcnow()
    poll = ctx.settings.poll_interval_s
    text = f'{{"poll_interval_s":{poll},"assignment":{body or "null"}}}'
    return Desired(f'"{serial}.{poll}"', text.encode(), serial), stale


def refresh_desired(ctx: AppContext, device_id: str, desired_serial: int) -> Desired:
    """Re-issue an assignment past half its lifetime (a write: run it in the threadpool), then read again."""
    reissue_if_stale(ctx, device_id, desired_serial)
    return read_desired(ctx, device_id)[0]


def _active(session: Session, artifact_ids: set[int]) -> dict[int, dict[str, Any]]:
    if not artifact_ids:
        return {}
    rows = session.execute(
        select(VersionArtifact.id, VersionArtifact.artifact_sha256, ModelVersion.version, Model.name)
        .join(ModelVersion, ModelVersion.id == VersionArtifact.version_id).join(Model, Model.id == ModelVersion.model_id)
        .where(VersionArtifact.id.in_(artifact_ids))
    ).all()
    return {r.id: {"model": r.name, "version": r.version, "sha256": r.artifact_sha256} for r in rows}


def _last_profiles(session: Session, device_id: str | None = None) -> dict[str, dict[str, Any]]:
    """Each device's latest ``profiled`` report: the version it measured and the numbers the gates read."""
    latest = select(func.max(Report.id)).where(Report.phase == "profiled")
    if device_id is not None:
        latest = latest.where(Report.device_id == device_id)
    latest = latest.group_by(Report.device_id)
    rows = session.execute(select(Report.device_id, Report.metrics, Report.created_at, Rollout.version)
                           .join(Rollout, Rollout.id == Report.rollout_id).where(Report.id.in_(latest))).all()
    keys = ("p50_ms", "p95_ms", "p99_ms", "peak_rss_mb", "golden_top1_agreement", "golden_passed", "runtime", "timing_source")
    return {r.device_id: {"version": r.version, "at": utc(r.created_at), **{k: (r.metrics or {}).get(k) for k in keys}} for r in rows}


def _public(ctx: AppContext, d: Device, active: dict[int, dict[str, Any]], profiles: dict[str, dict[str, Any]]) -> dict[str, Any]:
    seen = ctx.last_seen.peek(d.id) or utc(d.last_seen)
    return {"id": d.id, "name": d.name, "profile": d.profile, "tags": d.tags, "facts": d.facts, "enrolled_at": utc(d.enrolled_at),
            "last_seen": seen, "active": active.get(d.active_artifact_id) if d.active_artifact_id else None,
            "phase": d.phase, "serial": d.desired_serial, "decommissioned_at": utc(d.decommissioned_at), "last_profile": profiles.get(d.id)}


def list_devices(ctx: AppContext, profile: str | None, tag: str | None) -> list[dict[str, Any]]:
    """Every device, optionally of one profile and/or carrying one tag."""
    with ctx.db.read() as s:
        q = select(Device).order_by(Device.enrolled_at, Device.id)
        if profile:
            q = q.where(Device.profile == profile)
        devices = [d for d in s.execute(q).scalars() if not tag or tag in d.tags]
        active = _active(s, {d.active_artifact_id for d in devices if d.active_artifact_id})
        profiles = _last_profiles(s)
        return [_public(ctx, d, active, profiles) for d in devices]


def get_device(ctx: AppContext, device_id: str) -> dict[str, Any]:
    """One device, or NotFound."""
    with ctx.db.read() as s:
        d = s.get(Device, device_id)
        if d is None:
            raise NotFound(f"no device '{device_id}'", "List devices with GET /v1/devices.")
        return _public(ctx, d, _active(s, {d.active_artifact_id} if d.active_artifact_id else set()), _last_profiles(s, d.id))
