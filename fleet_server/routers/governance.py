"""Admin: named tokens, the audit log, device decommission, and the rollout list."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from fleet_server.deps import AdminDep, CtxDep
from fleet_server.services import governance
from fleet_server.hardening import IsoDateTime

router = APIRouter(tags=["governance"])

Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1)]


class TokenCreate(BaseModel):
    """``POST /v1/tokens``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=governance.TOKEN_NAME_PATTERN, description="Who acts with it, in the audit log (e.g. ci-pipeline).")
    scope: Literal["admin", "enroll"] = "admin"
    label: str = Field(default="", max_length=200)


@router.post("/v1/tokens", status_code=201)
def create_token(body: TokenCreate, ctx: CtxDep, _: AdminDep) -> dict:
    """A named admin or enroll token; the token is shown once."""
    return governance.create_named_token(ctx, body.scope, body.name, body.label)


@router.get("/v1/tokens")
def list_tokens(ctx: CtxDep, _: AdminDep, scope: Literal["admin", "enroll", "device"] | None = None, include_revoked: bool = False,
                limit: Limit = 100, offset: Offset = 0) -> dict:
    """Tokens by id, name, scope, created and revoked time (never the token or its hash)."""
    return governance.list_tokens(ctx, scope, include_revoked, limit, offset)


@router.post("/v1/tokens/{token_ref}/revoke")
def revoke_token(token_ref: Annotated[str, Path(max_length=64)], ctx: CtxDep, who: AdminDep) -> dict:
    """Revoke a token by id or name; refused from the next request on."""
    return governance.revoke_token(ctx, token_ref, who.token_id)


@router.post("/v1/devices/{device_id}/decommission")
def decommission(device_id: str, ctx: CtxDep, _: AdminDep) -> dict:
    """Retire a device: its token stops working, no rollout targets it again."""
    return governance.decommission(ctx, device_id)


@router.get("/v1/audit")
def audit(ctx: CtxDep, _: AdminDep, since: IsoDateTime | None = None, actor: Annotated[str | None, Query(max_length=64)] = None,
          action: Annotated[str | None, Query(max_length=64)] = None, limit: Limit = 100, offset: Offset = 0) -> dict:
    """Admin actions, newest first: who, what, when, from where, result."""
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.timezone.utc)
    return governance.list_audit(ctx, since=since, actor=actor, action=action, limit=limit, offset=offset)


@router.get("/v1/rollouts")
def list_rollouts(ctx: CtxDep, _: AdminDep, state: Annotated[Literal["running", "paused", "completed", "failed", "rolled_back"] | None, Query()] = None,
                  model: Annotated[str | None, Query(max_length=64)] = None, version: Annotated[str | None, Query(max_length=64)] = None,
                  limit: Limit = 50, offset: Offset = 0) -> dict:
    """Rollouts, newest first, filtered by state, model and version, with paging."""
    return governance.list_rollouts(ctx, state=state, model=model, version=version, limit=limit, offset=offset)
