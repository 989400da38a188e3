"""Governance: named admin/enroll tokens (create, list, revoke), the audit log, device decommission, the rollout list."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from sqlalchemy import func, select, update

from edgekit.protocol import ACTIVE_ROLLOUT_STATES, ROLLOUT_STATES
from fleet_server.context import AppContext
from fleet_server.db import utc, utcnow
from fleet_server.errors import Conflict, InvalidRequest, NotFound
from fleet_server.revocations import announce_revocation
from fleet_server.tables import AuditEvent, Device, Rollout, RolloutDevice, RolloutWave, Token
from fleet_server.tokens import create_token

__all__ = ["TOKEN_NAME_PATTERN", "create_named_token", "decommission", "list_audit", "list_rollouts", "list_tokens", "revoke_token"]

TOKEN_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


def _token_public(t: Token) -> dict[str, Any]:
    return {"id": t.id, "name": t.name, "scope": t.scope, "label": t.label, "device_id": t.device_id,
            "created_at": utc(t.created_at), "revoked_at": utc(t.revoked_at)}


def create_named_token(ctx: AppContext, scope: str, name: str, label: str = "") -> dict[str, Any]:
    """A new admin or enroll token with a unique name; the token itself is in the answer only."""
    if not re.fullmatch(TOKEN_NAME_PATTERN, name):
        raise InvalidRequest(f"invalid token name {name!r}", f"Token names match {TOKEN_NAME_PATTERN}, e.g. ci-pipeline.")
    with ctx.db.write() as s:
        if s.execute(select(Token.id).where(Token.name == name)).first() is not None:
            raise Conflict(f"a token named '{name}' exists", "Pick another name, or revoke that token and use a new name.")
        value = create_token(s, scope, label=label, name=name)
        s.flush()
        row = s.execute(select(Token).where(Token.name == name)).scalar_one()
        return {**_token_public(row), "token": value}


def list_tokens(ctx: AppContext, scope: str | None, include_revoked: bool, limit: int, offset: int) -> dict[str, Any]:
    """Tokens (never their values or hashes), newest first."""
    with ctx.db.read() as s:
        q = select(Token)
        if scope is not None:
            q = q.where(Token.scope == scope)
        if not include_revoked:
            q = q.where(Token.revoked_at.is_(None))
        total = s.execute(select(func.count()).select_from(q.subquery())).scalar_one()
        rows = s.execute(q.order_by(Token.id.desc()).limit(limit).offset(offset)).scalars().all()
        return {"items": [_token_public(t) for t in rows], "total": total, "limit": limit, "offset": offset}


def _find_token(s, ref: str) -> Token:  # noqa: ANN001
    t = s.execute(select(Token).where(Token.id == int(ref)) if ref.isdigit() else select(Token).where(Token.name == ref)).scalar_one_or_none()
    if t is None:
        raise NotFound(f"no token '{ref}'", "List tokens with GET /v1/tokens (by id or name).")
    return t


def revoke_token(ctx: AppContext, ref: str, by_token_id: int | None) -> dict[str, Any]:
    """Revoke a token by id or name: refused on the next request (admin tokens on every server process)."""
    with ctx.db.write() as s:
        t = _find_token(s, ref)
        if t.id == by_token_id:
            raise Conflict("a token cannot revoke itself", "Revoke it with another admin token, so one stays usable.")
        if t.revoked_at is None:
            t.revoked_at = utcnow()
        ctx.tokens.drop(t.token_hash)
        announce_revocation(s, token_hash=t.token_hash)  # every other replica drops it from its cache at commit
        return _token_public(t)


def decommission(ctx: AppContext, device_id: str) -> dict[str, Any]:
    """Retire a device: its tokens are revoked and no rollout targets it again; refused while a running rollout has it."""
    with ctx.db.write() as s:
        d = s.get(Device, device_id)
        if d is None:
            raise NotFound(f"no device '{device_id}'", "List devices with GET /v1/devices.")
        busy = s.execute(select(Rollout.id).join(RolloutDevice, RolloutDevice.rollout_id == Rollout.id)
                         .where(RolloutDevice.device_id == device_id, Rollout.state.in_(ACTIVE_ROLLOUT_STATES))).first()
        if busy is not None:
            raise Conflict(f"device {device_id} is in running rollout {busy[0]}", "Wait for it to finish, or pause/rollback it first.")
        now = utcnow()
        if d.decommissioned_at is None:
            d.decommissioned_at = now
        s.execute(update(Token).where(Token.device_id == device_id, Token.revoked_at.is_(None)).values(revoked_at=now))
        ctx.tokens.drop_device(device_id)
        announce_revocation(s, device_id=device_id)
        return {"id": d.id, "name": d.name, "decommissioned_at": utc(d.decommissioned_at)}


def list_audit(ctx: AppContext, *, since: dt.datetime | None, actor: str | None, action: str | None, limit: int, offset: int) -> dict[str, Any]:
    """Audit events, newest first."""
    with ctx.db.read() as s:
        q = select(AuditEvent)
        if since is not None:
            q = q.where(AuditEvent.at >= since)
        if actor:
            q = q.where(AuditEvent.actor == actor)
        if action:
            q = q.where(AuditEvent.action.contains(action, autoescape=True))
        total = s.execute(select(func.count()).select_from(q.subquery())).scalar_one()
        rows = s.execute(q.order_by(AuditEvent.id.desc()).limit(limit).offset(offset)).scalars().all()
        items = [{"id": e.id, "at": utc(e.at), "actor": e.actor, "token_id": e.token_id, "action": e.action, "target": e.target,
                  "remote_addr": e.remote_addr, "status": e.status, "result": e.result, "detail": e.detail} for e in rows]
    return {"items": items, "total": total, "limit": limit, "offset": offset}


def list_rollouts(ctx: AppContext, *, state: str | None, model: str | None, version: str | None, limit: int, offset: int) -> dict[str, Any]:
    """Rollouts, newest first, with their wave states (no device lists: GET /v1/rollouts/{id} has them)."""
    if state is not None and state not in ROLLOUT_STATES:
        raise InvalidRequest(f"unknown rollout state {state!r}", f"One of {', '.join(ROLLOUT_STATES)}.")
    with ctx.db.read() as s:
        q = select(Rollout)
        if state:
            q = q.where(Rollout.state == state)
        if model:
            q = q.where(Rollout.model == model)
        if version:
            q = q.where(Rollout.version == version)
        total = s.execute(select(func.count()).select_from(q.subquery())).scalar_one()
        rows = s.execute(q.order_by(Rollout.created_at.desc(), Rollout.id).limit(limit).offset(offset)).scalars().all()
        waves: dict[str, list[dict[str, Any]]] = {}
        if rows:
            for w in s.execute(select(RolloutWave).where(RolloutWave.rollout_id.in_([r.id for r in rows])).order_by(RolloutWave.index)).scalars():
                waves.setdefault(w.rollout_id, []).append({"index": w.index, "percent": w.percent, "state": w.state})
        items = [{"id": r.id, "model": r.model, "version": r.version, "state": r.state, "current_wave": r.current_wave,
                  "created_at": utc(r.created_at), "updated_at": utc(r.updated_at), "reason": r.reason, "gates": r.gates,
                  "waves": waves.get(r.id, [])} for r in rows]
    return {"items": items, "total": total, "limit": limit, "offset": offset}
