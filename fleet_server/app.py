"""``create_app(settings)``: the FastAPI app, its lifespan (migrations, key, engine loop) and the
one place that turns errors into the protocol's JSON error shape."""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgekit import __version__
from edgekit.errors import EdgekitError, OutputError
from fleet_server.audit import AuditMiddleware
from fleet_server.context import AppContext
from fleet_server.db import Database
from fleet_server.errors import Unavailable, http_status
from fleet_server.hardening import ConnectionCloseOn5xx, JsonShapeMiddleware, allowed_methods, document_limits
from fleet_server.limits import BodyLimitMiddleware, NulMiddleware
from fleet_server.metrics import FleetMetrics, MetricsMiddleware
from fleet_server.leadership import leadership_for
from fleet_server.artifacts_db import DatabaseArtifactStore
from fleet_server.replicas import ReplicaGuard, check_schema, claim_signing_key, key_mismatch, serialised_upload
from fleet_server.revocations import RevocationListener
from fleet_server.responses import ErrorBody
from fleet_server.routers import dashboard, device, fleet, governance, models, public, rollouts, stats
from fleet_server.services.engine import step_all
from fleet_server.routers import publishers as trust_routes
from fleet_server.routers import proxy as proxy_routes
from fleet_server.services.keys import finish_pending_rotation
from fleet_server.services.registry import sweep_orphan_artifacts
from fleet_server.settings import Settings
from fleet_server.signer import ServerKey
from fleet_server.storage import ArtifactStore, DirectoryArtifactStore
from fleet_server.tokens import TokenCache
from fleet_server.writer import TelemetryWriter

__all__ = ["bootstrap", "create_app"]

log = logging.getLogger("edgekit.fleet")


def bootstrap(settings: Settings, *, exclusive_sqlite: bool = False) -> AppContext:
    """Open the database (SQLite: migrate it; PostgreSQL: check it is migrated), load or create the signing key
    (the fleet's, when replicas share the database), open the artifact store.

    ``exclusive_sqlite``: refuse to start while another server process serves the same SQLite file
    (``edgekit server start``); otherwise that is only logged (fleet_server.leadership).
    """
    try:
        if not settings.data_dir.exists():
            settings.data_dir.mkdir(parents=True, mode=0o700)
        store: ArtifactStore | None = None
        if settings.artifact_store == "directory":
            store = DirectoryArtifactStore(settings.artifacts_dir)
            store.clear_temporaries()
        key = ServerKey.load_or_create(settings.key_path)
    except OSError as e:
        raise OutputError(f"cannot write to the data dir {settings.data_dir}: {e.strerror}", "Choose a --data-dir the server can write.") from None
    db = Database(settings.database_url, pool_size=settings.db_pool_size)
    if db.dialect == "sqlite":  # the embedded default migrates at start; replicas on PostgreSQL: 'edgekit server migrate', once
        head = db.migrate()
    else:
        head = db.head()
        check_schema(db, head)
    if store is None:
        store = DatabaseArtifactStore(db)
    ctx = AppContext(settings=settings, db=db, store=store, key=key, tokens=TokenCache(settings.token_cache_ttl_s), head=head)
    finish_pending_rotation(ctx)  # a server key rotation cut short by a crash
    claim_signing_key(db, ctx.key.key_id)  # replicas must sign with one key
    ctx.leadership = leadership_for(db.dialect, db.url, exclusive_sqlite=exclusive_sqlite)
    with serialised_upload(ctx):  # another replica may be between an artifact write and its commit
        sweep_orphan_artifacts(ctx)
    return ctx


def engine_tick(ctx: AppContext) -> None:
    """One pass of the background loop: write buffered last-seen times, advance every rollout."""
    ctx.leadership.acquire()  # first: a replica whose database is gone stops being the leader at once
    ctx.last_seen.flush(ctx.db)
    ctx.refusal = key_mismatch(ctx)  # a rotation through another replica
    if ctx.refusal is None:
        step_all(ctx)


async def _engine_loop(ctx: AppContext) -> None:
    while True:
        try:
            await run_in_threadpool(engine_tick, ctx)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the loop must survive a database hiccup; it retries next tick
            log.exception("rollout engine step failed; retrying")
        await asyncio.sleep(ctx.settings.engine_interval_s)


def _error(status: int, code: str, message: str, hint: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "hint": hint}}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EdgekitError)
    async def domain_error(request: Request, exc: EdgekitError) -> JSONResponse:
        status, code = http_status(exc)
        request.state.error_code = code  # the audit log's result
        if status >= 500:
            log.error("internal error on %s %s: %s", request.method, request.url.path, exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if isinstance(exc, Unavailable):
            headers = {"Retry-After": str(exc.retry_after_s)}
        return _error(status, code, exc.message, exc.hint, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(x) for x in first.get("loc", ()))
        request.state.error_code = "invalid_request"
        return _error(422, "invalid_request", f"{loc}: {first.get('msg')}" if loc else str(first.get("msg")),
                      "See GET /openapi.json for the request's schema.")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's "error parsing the body" (e.g. JSON nested too deep): a malformed request
            return _error(422, "invalid_request", f"malformed request body ({exc.detail})", "Send well-formed JSON (see GET /openapi.json).")
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = {"Allow": allowed_methods(request.app, request.url.path)} if exc.status_code == 405 else getattr(exc, "headers", None)
        return _error(exc.status_code, code, str(exc.detail), "See docs/protocol.md for the routes.", headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The details (which may name files, SQL or data) go to the log only; the client gets an id to find them by.
        request_id = uuid.uuid4().hex
        log.error("unhandled error on %s %s (request id %s)", request.method, request.url.path, request_id, exc_info=exc)
        return _error(500, "internal_error", f"internal server error (request id {request_id})",
                      "This is a server bug; the server log has the details under this request id.", {"X-Request-ID": request_id, "Connection": "close"})


def create_app(settings: Settings, *, context: AppContext | None = None) -> FastAPI:
    """The fleet server app; the database, key and engine loop come up in its lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        ctx = context or await run_in_threadpool(bootstrap, settings)
        app.state.ctx = ctx
        gc.collect()
        gc.freeze()  # the import-time heap is never garbage: keep it out of every later full collection (shorter GC pauses)
        ctx.telemetry = TelemetryWriter(ctx.db, ctx.settings.telemetry_queue_points)
        ctx.telemetry.start()
        if ctx.db.dialect == "postgresql":
            ctx.revocations = RevocationListener(ctx.db.url, ctx.tokens).start()
        task = asyncio.create_task(_engine_loop(ctx))
        try:
            yield
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            await run_in_threadpool(ctx.telemetry.stop)  # writes what is queued
            await run_in_threadpool(ctx.last_seen.flush, ctx.db)
            if ctx.revocations is not None:
                await run_in_threadpool(ctx.revocations.stop)
            ctx.leadership.close()
            ctx.db.dispose()

    app = FastAPI(title="edgekit fleet server", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,  # /docs: routers.dashboard
                  description="Model registry, devices, signed staged rollouts and telemetry. See docs/protocol.md.")
    app.state.metrics = FleetMetrics(lambda: getattr(app.state, "ctx", None) and app.state.ctx.db)
    _install_error_handlers(app)
    errors = {status: {"model": ErrorBody, "description": text} for status, text in (
        (400, "Wrong request"), (401, "No or unknown token"), (403, "Wrong scope or another device's data"), (404, "Not found"),
        (409, "Exists, or the state forbids it"), (413, "Too large"), (416, "Range not satisfiable"), (422, "Malformed request"))}
    app.include_router(public.router)
    app.include_router(dashboard.router)
    for r in (models.router, governance.router, rollouts.router, fleet.router, stats.router, device.router):
        app.include_router(r, responses=errors)
    app.include_router(trust_routes.router, responses=errors)
    app.include_router(proxy_routes.router, responses=errors)
    app.add_middleware(JsonShapeMiddleware)  # inside the body limit: it reads the (bounded) body
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_json_bytes)
    app.add_middleware(NulMiddleware)
    app.add_middleware(AuditMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(ReplicaGuard)  # 503 while this replica's signing key is not the fleet's
    app.add_middleware(ConnectionCloseOn5xx)
    document_limits(app, max_json_bytes=settings.max_json_bytes, max_upload_bytes=settings.max_upload_bytes)
    return app
