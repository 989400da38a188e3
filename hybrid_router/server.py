"""``edgekit cloud serve``: ONNX models over the KServe v2 protocol (REST and gRPC), dynamically batched.

REST routes (the Open Inference Protocol, as Triton/KServe/MLServer serve them): ``/v2``,
``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``, ``.../ready``,
``.../infer``, and Triton's ``.../config``, ``.../stats``, ``/v2/models/stats``,
``/v2/repository/index``, ``/v2/repository/models/{name}/load|unload``; plus Prometheus
``/metrics``. The gRPC ``GRPCInferenceService`` (hybrid_router.grpc_service) serves the same
repository on its own port.

Inputs come as JSON ``data`` or, with the binary tensor extension, as raw bytes after the JSON
header; outputs are JSON unless the request asks for binary (``binary_data`` on an output, or
``binary_data_output`` on the request). Every error, on every route (404s included), is the
protocol's ``{"error": "..."}`` body: bad input 400, unknown model 404, unavailable model 503,
full queue 429 with Retry-After; never a bare 500. Every answer of a model carries
``X-Edgekit-Provider``: the ONNX Runtime execution provider that ran it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from hybrid_router.batcher import BatchConfig, BatchStats, QueueFull, ShuttingDown
from hybrid_router.repository import ModelRepository, ModelSpec, ServedModel, UnknownModel
from hybrid_router.tensors import V2_OF, BadInput, InferRequest, decode_rest

__all__ = ["CloudServerSettings", "InferRequest", "ModelSpec", "create_app", "infer_outputs", "serve"]

log = logging.getLogger("edgekit.cloud")
PROVIDER_HEADER = "X-Edgekit-Provider"


@dataclass(frozen=True)
class CloudServerSettings:
    """Everything ``edgekit cloud serve`` takes. ``model``/``name`` is the first model; ``models`` any others."""

    model: str = ""
    name: str = ""
    host: str = "127.0.0.1"
    port: int = 8500
    batch: BatchConfig = BatchConfig()
    providers: tuple[str, ...] | None = None
    require_providers: bool = False
    intra_op_threads: int | None = None
    models: tuple[ModelSpec, ...] = ()
    warmup_shape: tuple[int, ...] | None = None
    grpc_port: int | None = None
    """gRPC port; None: no gRPC endpoint."""
    grpc_required: bool = True
    """False for the default port (REST + 1): when it is taken, serve REST only and say so."""

    def specs(self) -> list[ModelSpec]:
        first = [ModelSpec(self.name, self.model, "1", self.warmup_shape)] if self.model else []
        return first + list(self.models)


class _Metrics:
    """Prometheus metrics in their own registry (one per app, so apps in one process do not collide)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("edgekit_cloud_queue_depth", "Requests waiting for a batch.", registry=self.registry)
        self.batch_size = Histogram("edgekit_cloud_batch_size", "Rows per model call.", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.requests = Counter("edgekit_cloud_requests", "Inference requests by HTTP status.", ["status"], registry=self.registry)
        self.latency = Histogram("edgekit_cloud_request_latency_seconds", "Inference request latency in the server.",
                                 registry=self.registry, buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self.queue_wait = Histogram("edgekit_cloud_queue_wait_seconds", "Time the oldest request of a batch waited.",
                                    registry=self.registry, buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5))
        self.run = Histogram("edgekit_cloud_inference_seconds", "Model call time per batch.", registry=self.registry,
                             buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1))

    def on_batch(self, s: BatchStats) -> None:
        self.batch_size.observe(s.rows)
        self.queue_wait.observe(s.queue_wait_s)
        self.run.observe(s.run_s)


class InferFailure(Exception):
    """An inference that cannot be answered: the HTTP status, the message and extra headers."""

    def __init__(self, status: int, message: str, retry_after: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


async def infer_outputs(model: ServedModel, x: np.ndarray) -> list[np.ndarray]:
    """Run one request through the model's batcher (shared by REST and gRPC); InferFailure on any failure."""
    if not model.ready or model.batcher is None:
        raise InferFailure(503, f"model '{model.name}' version {model.version} is not ready: {model.reason or model.state.lower()}",
                           retry_after=model.state == "LOADING")
    t0 = time.perf_counter()
    try:
        outs = await model.batcher.submit(x)
    except QueueFull as e:
        model.stats.on_request(False, time.perf_counter() - t0)
        raise InferFailure(429, f"server overloaded: {e}", retry_after=True) from None
    except ShuttingDown as e:
        model.stats.on_request(False, time.perf_counter() - t0)
        raise InferFailure(503, str(e), retry_after=True) from None
    except Exception as e:  # noqa: BLE001 - the model failed on input that passed the checks: a server error, as the protocol's body
        log.exception("inference failed")
        model.stats.on_request(False, time.perf_counter() - t0)
        raise InferFailure(500, f"inference failed: {type(e).__name__}: {str(e)[:200]}") from None
    model.stats.on_request(True, time.perf_counter() - t0)
    return outs


def _wanted_outputs(model: ServedModel, req: InferRequest) -> list[tuple[Any, bool]]:
    """(output spec, binary?) for each output to return, in the request's order (all outputs when none is named)."""
    default_binary = bool((req.parameters or {}).get("binary_data_output", False))
    specs = {o.name: o for o in model.onnx.outputs}
    if not req.outputs:
        return [(o, default_binary) for o in model.onnx.outputs]
    wanted = []
    for o in req.outputs:
        if o.name not in specs:
            raise BadInput(f"unknown output '{o.name}'; the model's outputs: {', '.join(specs)}")
        wanted.append((specs[o.name], bool((o.parameters or {}).get("binary_data", default_binary))))
    return wanted


def create_app(settings: CloudServerSettings):
    """The FastAPI app serving every model of ``settings`` (and the gRPC endpoint when ``grpc_port`` is set)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    metrics = _Metrics()
    repo = ModelRepository(settings.specs(), settings.batch, providers=settings.providers, require=settings.require_providers,
                           threads=settings.intra_op_threads, on_batch=metrics.on_batch)

    def provider_headers(model: ServedModel | None = None) -> dict[str, str]:
        m = model or next((m for m in repo.all() if m.provider), None)
        return {PROVIDER_HEADER: m.provider} if m is not None and m.provider else {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        grpc_server = None
        if settings.grpc_port is not None:
            from hybrid_router.grpc_service import start_grpc

            grpc_server = await start_grpc(repo, settings.host, settings.grpc_port)
        task = asyncio.get_running_loop().create_task(repo.load_all())
        yield
        task.cancel()
        if grpc_server is not None:
            await grpc_server.stop(1.0)
        await repo.stop()

    app = FastAPI(title="edgekit cloud", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings, app.state.repository, app.state.metrics = settings, repo, metrics

    def error(status: int, msg: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        headers = dict(exc.headers or {})
        return error(exc.status_code, msg, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        return error(400, f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}")

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error(500, f"internal error: {type(exc).__name__}", {"Connection": "close"})

    def lookup(name: str, version: str | None) -> ServedModel | JSONResponse:
        try:
            return repo.get(name, version)
        except UnknownModel as e:
            return error(404, str(e))

    @app.get("/v2")
    async def server_metadata() -> dict:
        from edgekit import __version__

        return {"name": "edgekit-cloud", "version": __version__,
                "extensions": ["binary_tensor_data", "model_repository", "statistics", "model_configuration"]}

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        body: dict[str, Any] = {"ready": repo.ready}
        if not repo.ready:
            body["models"] = repo.index()
        return JSONResponse(body, status_code=200 if repo.ready else 503, headers=provider_headers())

    @app.get("/v2/models/stats")
    async def all_stats() -> dict:
        return {"model_stats": [m.stats.as_dict(m.name, m.version) for m in repo.all()]}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def metadata(name: str, version: str | None = None) -> Response:
        m = lookup(name, version)
        if isinstance(m, JSONResponse):
            return m
        if m.onnx is None:
            return error(503, f"model '{name}' version {m.version} is not loaded: {m.reason}")
        return JSONResponse(m.metadata(repo.versions(name)), headers=provider_headers(m))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        m = lookup(name, version)
        if isinstance(m, JSONResponse):
            return m
        body = {"name": name, "version": m.version, "ready": m.ready, "state": m.state}
        if not m.ready:
            body["reason"] = m.reason
        return JSONResponse(body, status_code=200 if m.ready else 503)

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str | None = None) -> Response:
        m = lookup(name, version)
        if isinstance(m, JSONResponse):
            return m
        if m.onnx is None:
            return error(503, f"model '{name}' version {m.version} is not loaded: {m.reason}")
        return JSONResponse(m.config())

    @app.get("/v2/models/{name}/stats")
    @app.get("/v2/models/{name}/versions/{version}/stats")
    async def model_stats(name: str, version: str | None = None) -> Response:
        if name not in repo.models:
            return error(404, f"unknown model '{name}'")
        try:
            models = [repo.get(name, version)] if version else [repo.models[name][v] for v in repo.versions(name)]
        except UnknownModel as e:
            return error(404, str(e))
        return JSONResponse({"model_stats": [m.stats.as_dict(m.name, m.version) for m in models]})

    @app.post("/v2/repository/index")
    async def repository_index(request: Request) -> Response:
        body = await request.body()
        ready_only = False
        if body.strip():
            try:
                ready_only = bool(json.loads(body).get("ready", False))
            except (ValueError, AttributeError):
                return error(400, "the repository index request body is not a JSON object")
        return JSONResponse(repo.index(ready_only))

    @app.post("/v2/repository/models/{name}/load")
    async def repository_load(name: str) -> Response:
        try:
            models = await repo.load(name)
        except UnknownModel as e:
            return error(400, f"failed to load '{name}': {e}")
        failed = [m for m in models if not m.ready]
        if failed:
            return error(400, f"failed to load '{name}': " + "; ".join(f"version {m.version}: {m.reason}" for m in failed))
        return JSONResponse({})

    @app.post("/v2/repository/models/{name}/unload")
    async def repository_unload(name: str) -> Response:
        try:
            await repo.unload(name)
        except UnknownModel as e:
            return error(400, f"failed to unload '{name}': {e}")
        return JSONResponse({})

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        t0 = time.perf_counter()
        resp = await _infer(name, version, request)
        metrics.requests.labels(str(resp.status_code)).inc()
        metrics.latency.observe(time.perf_counter() - t0)
        return resp

    async def _infer(name: str, version: str | None, request: Request) -> Response:
        m = lookup(name, version)
        if isinstance(m, JSONResponse):
            return m
        if not m.ready:
            return error(503, f"model '{name}' version {m.version} is not ready: {m.reason or m.state.lower()}",
                         {"Retry-After": "1"} if m.state == "LOADING" else None)
        headers = provider_headers(m)
        try:
            x, req = decode_rest(await request.body(), request.headers.get("inference-header-content-length"), m.input)
            wanted = _wanted_outputs(m, req)
        except BadInput as e:
            return error(400, str(e), headers)
        metrics.queue_depth.set(m.batcher.depth if m.batcher else 0)
        try:
            outs = await infer_outputs(m, x)
        except InferFailure as e:
            return error(e.status, e.message, {**headers, **({"Retry-After": "1"} if e.retry_after else {})})
        finally:
            metrics.queue_depth.set(m.batcher.depth if m.batcher else 0)
        by_name = {spec.name: arr for spec, arr in zip(m.onnx.outputs, outs)}
        body: dict[str, Any] = {"model_name": m.name, "model_version": m.version, "outputs": []}
        if req.id is not None:
            body["id"] = req.id
        blobs: list[bytes] = []
        for spec, binary in wanted:
            arr = np.ascontiguousarray(by_name[spec.name])
            entry: dict[str, Any] = {"name": spec.name, "datatype": V2_OF.get(arr.dtype.name, "FP32"), "shape": list(arr.shape)}
            if binary:
                raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
                entry["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            else:
                entry["data"] = arr.ravel().tolist()
            body["outputs"].append(entry)
        header = json.dumps(body).encode()
        if not blobs:
            return Response(header, media_type="application/json", headers=headers)
        return Response(header + b"".join(blobs), media_type="application/octet-stream",
                        headers={**headers, "Inference-Header-Content-Length": str(len(header))})

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue_depth.set(sum(m.batcher.depth for m in repo.all() if m.batcher is not None))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def bind_socket(host: str, port: int):
    """A listening TCP socket on (host, port); UsageError (with a hint) when the host does not resolve or the port is taken."""
    import socket

    from edgekit.errors import UsageError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"--host {host!r} does not resolve ({e.strerror})", "Use an address of this machine, e.g. 127.0.0.1 or 0.0.0.0.") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}",
                         "Choose a free port with --port (and --grpc-port), or stop what is using it.") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(settings: CloudServerSettings) -> None:
    """Run the server until interrupted; the ports are bound first, so a taken port or bad host is a clear error."""
    import uvicorn

    from dataclasses import replace

    from edgekit.errors import UsageError

    sock = bind_socket(settings.host, settings.port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.grpc_port is not None:
        try:
            bind_socket(settings.host, settings.grpc_port).close()  # fail now, not inside the server's start-up
        except UsageError as e:
            if settings.grpc_required:
                raise
            log.warning("no gRPC endpoint: %s (pass a free --grpc-port, or --no-grpc)", e.message)
            settings = replace(settings, grpc_port=None)
    app = create_app(settings)
    for m in app.state.repository.all():
        m.load_session()  # a missing file, a model ONNX Runtime cannot open or a missing provider: Error/Hint, not a server
    names = ", ".join(f"{s.name} v{s.version} ({s.path})" for s in settings.specs())
    log.info("serving %s on http://%s:%d%s; batching up to %d rows, %d us, queue %d", names, settings.host, settings.port,
             f" and grpc {settings.host}:{settings.grpc_port}" if settings.grpc_port is not None else "",
             settings.batch.max_batch, settings.batch.max_delay_us, settings.batch.max_queue)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
