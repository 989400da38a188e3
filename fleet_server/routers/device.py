"""Device routes: enroll, desired state (the hot path), artifacts, reports, telemetry."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from fleet_server.deps import AnyPrincipalDep, CtxDep, DeviceDep, EnrollDep
from fleet_server.responses import DesiredState, EnrollResponse, ErrorBody, ReportAck, TelemetryAck
from fleet_server.schemas import EnrollRequest, ReportRequest, TelemetryBatch
from fleet_server.services import artifacts, devices, reports, telemetry

router = APIRouter(tags=["device"])


@router.post("/v1/devices/enroll", status_code=201, response_model=EnrollResponse)
def enroll(body: EnrollRequest, ctx: CtxDep, _: EnrollDep) -> dict:
    """Register a device; its token is returned once."""
    return devices.enroll(ctx, body)


@router.get("/v1/device/desired", response_model=DesiredState, responses={304: {"description": "Unchanged since If-None-Match."}})
async def desired(request: Request, ctx: CtxDep, device_id: DeviceDep) -> Response:
    """The device's signed assignment (304 when its ETag still matches).

    The hot path. On SQLite the read runs on the event loop: a WAL read never waits for a lock and
    takes tens of microseconds, less than a hop to the threadpool and back costs under load. It uses
    a connection reserved for the event loop, so it never waits for the pool (fleet_server.db).
    """
    if ctx.db.dialect == "sqlite":
        state, stale = devices.read_desired(ctx, device_id, on_loop=True)
    else:
        state, stale = await run_in_threadpool(devices.read_desired, ctx, device_id)
    if stale:
        state = await run_in_threadpool(devices.refresh_desired, ctx, device_id, state.serial)
    headers = {"ETag": state.etag, "Cache-Control": "no-cache"}
    inm = request.headers.get("if-none-match")
    if inm is not None and (inm.strip() == state.etag or state.etag in (t.strip() for t in inm.split(","))):
        return Response(status_code=304, headers=headers)
    return Response(state.body, media_type="application/json", headers=headers)


def _chunks(store, sha256: str, start: int, length: int, chunk: int = 1 << 16):  # noqa: ANN001, ANN202 - a sync generator
    with store.open(sha256) as f:  # a file, or the database store's chunk reader (fleet_server.artifacts_db)
        f.seek(start)
        while length > 0:
            block = f.read(min(chunk, length))
            if not block:
                return
            length -= len(block)
            yield block


@router.get("/v1/artifacts/{sha256}", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "A Range of the artifact."}})
def get_artifact(sha256: str, request: Request, ctx: CtxDep, principal: AnyPrincipalDep) -> Response:
    """The .ekb bytes; single ``Range`` requests get 206."""
    size = artifacts.authorize_artifact(ctx, principal, sha256)
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "private, max-age=31536000, immutable"}
    if request.headers.get("if-none-match", "").strip() == etag:
        return Response(status_code=304, headers=headers)
    if_range = request.headers.get("if-range")
    rng = artifacts.parse_range(request.headers.get("range"), size) if if_range in (None, etag) else None
    if rng is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(_chunks(ctx.store, sha256, 0, size), media_type="application/octet-stream", headers=headers)
    start, end = rng
    headers.update({"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(end - start + 1)})
    return StreamingResponse(_chunks(ctx.store, sha256, start, end - start + 1), status_code=206, media_type="application/octet-stream", headers=headers)


@router.post("/v1/device/reports", response_model=ReportAck)
def report(body: ReportRequest, ctx: CtxDep, device_id: DeviceDep) -> dict:
    """Report a phase of an assignment; idempotent on (device, rollout, phase)."""
    return reports.record_report(ctx, device_id, body)


@router.post("/v1/device/telemetry", status_code=202, response_model=TelemetryAck,
             responses={503: {"model": ErrorBody, "description": "The write queue is full; retry after Retry-After seconds."}})
async def post_telemetry(body: TelemetryBatch, ctx: CtxDep, device_id: DeviceDep) -> dict:
    """A batch of per-minute telemetry points; 202 once committed (many posts share one transaction)."""
    return await telemetry.store_batch(ctx, device_id, body)
