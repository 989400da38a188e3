"""Public routes: health, readiness, Prometheus metrics, the server's public key."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from fleet_server.deps import CtxDep
from fleet_server.responses import PublicKey

router = APIRouter(tags=["public"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(ctx: CtxDep) -> Response:
    """Ready when the database answers, is at this package's newest migration, and this replica may serve
    (its signing key is the fleet's). ``engine``: whether this replica runs the rollout engine."""
    current = ctx.db.current()
    engine = "leader" if ctx.leadership.holds() else "standby"
    if current is None or current != ctx.head or ctx.refusal:
        return JSONResponse({"status": "not_ready", "database": ctx.db.dialect, "migrations": current, "expected": ctx.head,
                             "reason": ctx.refusal or ("database unreachable" if current is None else "schema version differs"),
                             "engine": engine}, status_code=503)
    return JSONResponse({"status": "ready", "database": ctx.db.dialect, "migrations": current, "engine": engine})


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format."}})
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    body = await run_in_threadpool(generate_latest, request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/server/public-key", response_model=PublicKey)
async def public_key(ctx: CtxDep) -> dict:
    """The Ed25519 key that signs every assignment (agents pin it at enrollment)."""
    return {"algorithm": "ed25519", "public_key": ctx.key.public_key, "key_id": ctx.key.key_id}
