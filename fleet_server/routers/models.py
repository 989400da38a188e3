"""Admin: the model registry (uploads, listing, one version)."""

from __future__ import annotations

import shutil

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from fleet_server.deps import AdminDep, CtxDep
from fleet_server.responses import ModelSummary, ModelVersionPublic
from fleet_server.services import registry
from fleet_server.uploads import receive_upload

router = APIRouter(tags=["models"])

# The body is parsed by fleet_server.uploads as it streams, so it is described here rather than as parameters.
_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["bundles"],
    "properties": {"version": {"type": "string", "description": "Defaults to the manifests' version."},
                   "bundles": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": ".ekb files"}},
}}}}}


@router.post("/v1/models/{name}/versions", status_code=201, response_model=ModelVersionPublic,
             openapi_extra=_UPLOAD_BODY)
async def upload_version(name: str, request: Request, ctx: CtxDep, _: AdminDep) -> dict:
    """Upload one or more .ekb bundles (multipart 'bundles', optional 'version') as one immutable version."""
    registry.check_name(name)
    work = await run_in_threadpool(registry.new_staging_dir, ctx)
    try:
        upload = await receive_upload(request, work, ctx.settings.max_upload_bytes)
        version = upload.fields.get("version") or None
        result = await run_in_threadpool(registry.upload_version, ctx, name, version, upload.files, work)
    finally:
        await run_in_threadpool(shutil.rmtree, work, True)
    return result


@router.get("/v1/models", response_model=list[ModelSummary])
def list_models(ctx: CtxDep, _: AdminDep) -> list[dict]:
    """Every model with its versions."""
    with ctx.db.read() as s:
        return registry.list_models(s)


@router.get("/v1/models/{name}/versions/{version}", response_model=ModelVersionPublic)
def get_version(name: str, version: str, ctx: CtxDep, _: AdminDep) -> dict:
    """One version with its artifacts and their validation."""
    with ctx.db.read() as s:
        return registry.get_version(s, name, version)
