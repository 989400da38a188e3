"""Signed assignments: a per-device serial that only grows, issued in the caller's transaction."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from fleet_server.context import AppContext
from fleet_server.db import utcnow
from fleet_server.signer import canonical_json
from fleet_server.tables import Artifact, Assignment, Device, VersionArtifact

__all__ = ["ASSIGNMENT_TYPE", "artifact_ref", "issue", "reissue_if_stale"]

ASSIGNMENT_TYPE = "edgekit.assignment/v1"


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def artifact_ref(session: Session, version_artifact_id: int | None) -> dict[str, Any] | None:
    """The ``artifact`` object of a payload for a version artifact (None → null); cached per transaction."""
    if version_artifact_id is None:
        return None
    cache = session.info.setdefault("edgekit_artifact_refs", {})
    if version_artifact_id in cache:
        return cache[version_artifact_id]
    va, size = session.execute(
        select(VersionArtifact, Artifact.size_bytes).join(Artifact, Artifact.sha256 == VersionArtifact.artifact_sha256)
        .where(VersionArtifact.id == version_artifact_id)
    ).one()
    ref = {"sha256": va.artifact_sha256, "size_bytes": size, "profile": va.profile, "format": va.format, "file": va.file,
           "manifest_sha256": va.manifest_sha256, "url": f"/v1/artifacts/{va.artifact_sha256}"}
    cache[version_artifact_id] = ref
    return ref


def issue(session: Session, ctx: AppContext, *, device_id: str, rollout_id: str, action: str, model: str, version: str,
          artifact_id: int | None, seq: int = 0, expect_desired_serial: int | None = None, reason: str | None = None) -> int | None:
    """Write one signed assignment and make it the device's desired state; returns its serial.

    The serial comes from ``UPDATE devices SET serial = serial + 1 ... RETURNING serial`` in the
    same transaction as the assignment row, so serials never repeat or go down. With
    ``expect_desired_serial`` the update only happens while the device still desires that serial
    (a concurrent re-issue wins once); None is returned when it lost.
    """
    guard = [Device.id == device_id]
    if expect_desired_serial is not None:
        guard.append(Device.desired_serial == expect_desired_serial)
    # synchronize_session=False: the ORM would otherwise scan every loaded Device per UPDATE (quadratic in a wave)
    serial = session.execute(update(Device).where(*guard).values(serial=Device.serial + 1).returning(Device.serial)
                             .execution_options(synchronize_session=False)).scalar_one_or_none()
    if serial is None:
        return None
    now = utcnow().replace(microsecond=0)
    expires = now + dt.timedelta(seconds=ctx.settings.assignment_ttl_s)
    content: dict[str, Any] = {
        "type": ASSIGNMENT_TYPE, "device_id": device_id, "rollout_id": rollout_id, "serial": serial, "action": action,
        "model": model, "version": version, "artifact": artifact_ref(session, artifact_id),
        "issued_at": _iso(now), "expires_at": _iso(expires),
    }
    if action == "revert":
        content["reason"] = reason or "server_rollback"
    payload = canonical_json(content)
    signature = ctx.key.sign(payload)
    session.add(Assignment(device_id=device_id, serial=serial, rollout_id=rollout_id, action=action, seq=seq, artifact_id=artifact_id,
                           payload=payload, signature=signature, issued_at=now, expires_at=expires))
    body = json.dumps({"payload": payload, "signature": signature, "key_id": ctx.key.key_id}, separators=(",", ":"))
    session.execute(update(Device).where(Device.id == device_id).values(
        desired_serial=serial, desired_body=body, desired_issued_at=now, desired_expires_at=expires).execution_options(synchronize_session=False))
    return serial


def reissue_if_stale(ctx: AppContext, device_id: str, desired_serial: int) -> None:
    """Re-issue a device's desired assignment with a new serial once it is past half its lifetime."""
    with ctx.db.write() as s:
        current = s.execute(select(Assignment).where(Assignment.device_id == device_id, Assignment.serial == desired_serial)).scalar_one_or_none()
        if current is None:
            return
        seq = s.execute(select(func.max(Assignment.seq)).where(
            Assignment.rollout_id == current.rollout_id, Assignment.device_id == device_id, Assignment.action == current.action)).scalar_one()
        data = json.loads(current.payload)
        issue(s, ctx, device_id=device_id, rollout_id=current.rollout_id, action=current.action, model=data["model"], version=data["version"],
              artifact_id=current.artifact_id, seq=seq + 1, expect_desired_serial=desired_serial, reason=data.get("reason"))
