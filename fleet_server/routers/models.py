"""Admin: the model registry (uploads, listing, one version)."""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from fleet_server.deps import AdminDep, CtxDep
from fleet_server.errors import BadRequest
from fleet_server.responses import ModelSummary, ModelVersionPublic
from fleet_server.services import registry
from fleet_server.uploads import receive_upload

router = APIRouter(tags=["models"])
log = logging.getLogger("edgekit.fleet")
T = TypeVar("T")

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
        check = functools.partial(registry.check_upload, ctx, name, version, upload.files, work)
        version, checked = await _with_deadline(check, ctx.settings.upload_validation_timeout_s, work)
        result = await run_in_threadpool(registry.store_version, ctx, name, version, checked)
    finally:
        await run_in_threadpool(shutil.rmtree, work, True)
    return result


async def _with_deadline(fn: Callable[[], T], timeout_s: float, work: Path) -> T:
    """Run the upload's checks (reads only) in a daemon thread; past ``timeout_s`` answer 400 ``validation_timeout``.

    A thread cannot be stopped: one past its deadline is abandoned (it is a daemon, so it never
    holds up the server's exit), its result is dropped, and it removes ``work`` itself when it ends,
    so nothing it wrote after the request's own clean-up stays in the staging directory.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()
    abandoned = threading.Event()

    def deliver(ok: bool, value: Any) -> None:
        if not done.done():
            (done.set_result if ok else done.set_exception)(value)

    def target() -> None:
        try:
            ok, value = True, fn()
        except BaseException as e:  # noqa: BLE001 - handed to the request, which re-raises it
            ok, value = False, e
        if abandoned.is_set():
            shutil.rmtree(work, ignore_errors=True)
            log.warning("an upload validation that passed its deadline ended; its staging directory is removed")
            return
        try:
            loop.call_soon_threadsafe(deliver, ok, value)
        except RuntimeError:  # the loop is closed: the server stopped meanwhile
            shutil.rmtree(work, ignore_errors=True)

    started = loop.time()
    threading.Thread(target=target, name="upload-validation", daemon=True).start()
    try:
        result = await asyncio.wait_for(asyncio.shield(done), timeout_s)
        if loop.time() - started <= timeout_s:  # a result that arrived late (a busy loop noticed the deadline after it) is late
            return result
    except TimeoutError:
        abandoned.set()
    except asyncio.CancelledError:  # the client went away or the server is stopping: let the thread clean up after itself
        abandoned.set()
        raise
    log.error("upload validation did not finish within %s s; answered 400 validation_timeout", timeout_s)
    raise BadRequest(f"validating the upload took longer than the server's limit of {timeout_s:g} s",
                     "Check the bundles (a huge or hostile golden set?), or raise EDGEKIT_UPLOAD_VALIDATION_TIMEOUT_S on the server.",
                     code="validation_timeout")


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
