"""Admin: rollouts and their actions."""

from __future__ import annotations

from fastapi import APIRouter

from fleet_server.deps import AdminDep, CtxDep
from fleet_server.responses import RolloutPublic
from fleet_server.schemas import RolloutCreate
from fleet_server.services import rollouts

router = APIRouter(tags=["rollouts"])


@router.post("/v1/rollouts", status_code=201, response_model=RolloutPublic)
def create_rollout(body: RolloutCreate, ctx: CtxDep, _: AdminDep) -> dict:
    """Start a staged rollout of a version to the devices a selector matches."""
    return rollouts.create_rollout(ctx, body)


@router.get("/v1/rollouts/{rollout_id}", response_model=RolloutPublic)
def get_rollout(rollout_id: str, ctx: CtxDep, _: AdminDep) -> dict:
    """A rollout with its waves, devices and gate results."""
    return rollouts.get_rollout(ctx, rollout_id)


@router.post("/v1/rollouts/{rollout_id}/pause", response_model=RolloutPublic)
def pause(rollout_id: str, ctx: CtxDep, _: AdminDep) -> dict:
    """No new wave starts."""
    return rollouts.pause(ctx, rollout_id)


@router.post("/v1/rollouts/{rollout_id}/resume", response_model=RolloutPublic)
def resume(rollout_id: str, ctx: CtxDep, _: AdminDep) -> dict:
    """Continue a paused rollout."""
    return rollouts.resume(ctx, rollout_id)


@router.post("/v1/rollouts/{rollout_id}/promote", response_model=RolloutPublic)
def promote(rollout_id: str, ctx: CtxDep, _: AdminDep) -> dict:
    """Every remaining device gets the version now (one last wave)."""
    return rollouts.promote(ctx, rollout_id)


@router.post("/v1/rollouts/{rollout_id}/rollback", response_model=RolloutPublic)
def rollback(rollout_id: str, ctx: CtxDep, _: AdminDep) -> dict:
    """Every device this rollout reached returns to its previous version."""
    return rollouts.rollback(ctx, rollout_id)
