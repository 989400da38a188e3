"""``edgekit cloud serve``: one ONNX model over the KServe v2 REST protocol, dynamically batched.

Routes (the Open Inference Protocol, as Triton/KServe/MLServer serve them): ``/v2``,
``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``,
``.../ready``, ``.../infer``; plus Prometheus ``/metrics``. Inputs come as JSON ``data`` or, with
Triton's binary tensor extension, as raw bytes after the JSON header; outputs are JSON. The server is live at once and
ready only after warm-up (the model run at batch 1 and at ``max_batch``). Every answer of the
model carries ``X-Edgekit-Provider``: the ONNX Runtime execution provider that ran it, also in
the model metadata. Bad input is a 400 with ``{"error": ...}``, a full queue a 429 with
Retry-After, never a 500.
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
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError

from hybrid_router.batcher import BatchConfig, BatchStats, DynamicBatcher, QueueFull, ShuttingDown
from hybrid_router.client import DATATYPES

__all__ = ["CloudServerSettings", "InferRequest", "create_app", "serve"]

log = logging.getLogger("edgekit.cloud")
_V2_OF = {v: k for k, v in DATATYPES.items()}
PROVIDER_HEADER = "X-Edgekit-Provider"


@dataclass(frozen=True)
class CloudServerSettings:
    """Everything ``edgekit cloud serve`` takes."""

    model: str
    name: str
    host: str = "127.0.0.1"
    port: int = 8500
    batch: BatchConfig = BatchConfig()
    providers: tuple[str, ...] | None = None
    require_providers: bool = False
    intra_op_threads: int | None = None


class InferInput(BaseModel):
    """One input tensor of a KServe v2 inference request."""

    model_config = ConfigDict(extra="ignore")
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    """An output the client asks for."""

    model_config = ConfigDict(extra="ignore")
    name: str


class InferRequest(BaseModel):
    """A KServe v2 inference request body."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


class BadInput(Exception):
    """A request the model cannot take (HTTP 400)."""


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


class _Model:
    """The served model with its KServe v2 metadata and request checks."""

    def __init__(self, settings: CloudServerSettings) -> None:
        from hybrid_router.cloud_model import OnnxCloudModel

        self.onnx = OnnxCloudModel(settings.model, providers=list(settings.providers) if settings.providers else None,
                                   require=settings.require_providers, intra_op_threads=settings.intra_op_threads)
        self.name = settings.name
        self.input = self.onnx.inputs[0]
        self.dtype = np.dtype(self.input.dtype)
        self.datatype = _V2_OF.get(self.input.dtype, self.input.dtype)
        if self.onnx.requested[0] != self.onnx.provider:
            log.warning("asked for %s, ONNX Runtime runs the model on %s", self.onnx.requested[0], self.onnx.provider)

    def metadata(self) -> dict[str, Any]:
        def t(i) -> dict[str, Any]:
            return {"name": i.name, "datatype": _V2_OF.get(i.dtype, i.dtype), "shape": list(i.shape)}

        return {"name": self.name, "versions": ["1"], "platform": "onnxruntime_onnx",
                "inputs": [t(i) for i in self.onnx.inputs], "outputs": [t(o) for o in self.onnx.outputs],
                "parameters": {"execution_provider": self.onnx.provider, "providers": self.onnx.providers,
                               "requested_providers": self.onnx.requested, "model_file": self.onnx.path.name}}

    def parse(self, body: bytes, header_length: str | None = None) -> tuple[np.ndarray, str | None, str | None]:
        """The input array, the request id and the requested output name; BadInput when it does not fit.

        ``header_length`` is the ``Inference-Header-Content-Length`` of the binary tensor extension
        (Triton's): the JSON header is that many bytes, the raw tensor bytes follow it.
        """
        binary = b""
        if header_length is not None:
            try:
                n = int(header_length)
            except ValueError:
                raise BadInput("Inference-Header-Content-Length is not a number") from None
            if not 0 < n <= len(body):
                raise BadInput(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
            body, binary = body[:n], body[n:]
        try:
            req = InferRequest.model_validate_json(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise BadInput(f"not a KServe v2 inference request: {where}: {first['msg']}") from None
        if len(req.inputs) != 1:
            raise BadInput(f"the model takes 1 input, the request has {len(req.inputs)}")
        tin = req.inputs[0]
        if tin.name != self.input.name:
            raise BadInput(f"unknown input '{tin.name}'; the model's input is '{self.input.name}'")
        if tin.datatype != self.datatype:
            raise BadInput(f"input '{tin.name}' has datatype {tin.datatype}; the model takes {self.datatype}")
        want = self.input.shape
        if len(tin.shape) != len(want) or any(s < 0 for s in tin.shape) or any(w >= 0 and s != w for s, w in zip(tin.shape[1:], want[1:])) \
                or (want[0] >= 0 and tin.shape[0] != want[0]):
            raise BadInput(f"input shape {tin.shape} does not fit the model's {list(want)} (-1: any size)")
        if tin.shape[0] < 1:
            raise BadInput("the batch is empty")
        size = (tin.parameters or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size != len(binary):
                raise BadInput(f"binary_data_size {size} does not match the {len(binary)} bytes after the JSON header")
            if size != int(np.prod(tin.shape)) * self.dtype.itemsize:
                raise BadInput(f"input has {size} bytes, shape {tin.shape} of {self.datatype} needs {int(np.prod(tin.shape)) * self.dtype.itemsize}")
            x = np.frombuffer(binary, dtype=self.dtype)
        elif tin.data is None:
            raise BadInput(f"input '{tin.name}' has neither 'data' nor binary_data_size")
        else:
            try:
                x = np.asarray(tin.data, dtype=self.dtype)
            except (ValueError, TypeError):
                raise BadInput(f"input data is not {self.datatype} numbers") from None
        if x.size != int(np.prod(tin.shape)):
            raise BadInput(f"input has {x.size} values, shape {tin.shape} needs {int(np.prod(tin.shape))}")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise BadInput("input holds NaN or infinity")
        out = req.outputs[0].name if req.outputs else None
        if out is not None and out not in {o.name for o in self.onnx.outputs}:
            raise BadInput(f"unknown output '{out}'")
        return x.reshape(tin.shape), req.id, out

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        return self.onnx.session.run(None, {self.input.name: x})


def create_app(settings: CloudServerSettings):
    """The FastAPI app serving one model."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    model = _Model(settings)
    metrics = _Metrics()
    batch = settings.batch
    static = model.input.shape[0] if model.input.shape and model.input.shape[0] > 0 else None
    if static is not None and batch.max_batch != 1:
        # a graph with a fixed batch axis takes exactly that many rows: no batching across requests
        log.warning("model input has a fixed batch of %d; serving request by request", static)
        batch = BatchConfig(1, batch.max_delay_us, batch.max_queue)
    batcher = DynamicBatcher(lambda x: _Outputs(model.run(x)), batch, on_batch=metrics.on_batch)
    state = {"ready": False}
    headers = {PROVIDER_HEADER: model.onnx.provider}

    async def warm_up() -> None:
        sizes = [static] if static is not None else sorted({1, batch.max_batch})
        shape = [d if d > 0 else 1 for d in model.input.shape[1:]]
        try:
            for n in sizes:
                for _ in range(3):
                    await batcher.run_direct(np.zeros([n, *shape], dtype=model.dtype))
        except Exception:  # noqa: BLE001 - stay live and unready, and say why
            log.exception("warm-up of %s failed; the server stays not ready", model.name)
            return
        state["ready"] = True
        log.info("model %s warm on %s; ready", model.name, model.onnx.provider)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        task = asyncio.get_running_loop().create_task(warm_up())
        yield
        task.cancel()
        await batcher.stop()

    app = FastAPI(title="edgekit cloud", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings, app.state.model, app.state.batcher, app.state.metrics = settings, model, batcher, metrics

    def error(status: int, msg: str, **extra: str) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=status, headers={**headers, **extra})

    def known(name: str, version: str | None = None) -> JSONResponse | None:
        if name != model.name:
            return error(404, f"unknown model '{name}'; this server serves '{model.name}'")
        if version is not None and version != "1":
            return error(404, f"unknown version '{version}' of '{name}'; versions: 1")
        return None

    @app.get("/v2")
    async def server_metadata() -> dict:
        from edgekit import __version__

        return {"name": "edgekit-cloud", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503, headers=headers)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def metadata(name: str, version: str | None = None) -> Response:
        return known(name, version) or JSONResponse(model.metadata(), headers=headers)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        return known(name, version) or JSONResponse({"name": name, "ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        t0 = time.perf_counter()
        resp = known(name, version) or await _infer(request)
        metrics.requests.labels(str(resp.status_code)).inc()
        metrics.latency.observe(time.perf_counter() - t0)
        return resp

    async def _infer(request: Request) -> Response:
        if not state["ready"]:
            return error(503, "model is warming up", **{"Retry-After": "1"})
        try:
            x, req_id, out_name = model.parse(await request.body(), request.headers.get("inference-header-content-length"))
        except BadInput as e:
            return error(400, str(e))
        metrics.queue_depth.set(batcher.depth)
        try:
            outs = await batcher.submit(x)
        except QueueFull as e:
            return error(429, f"server overloaded: {e}", **{"Retry-After": "1"})
        except ShuttingDown as e:
            return error(503, str(e), **{"Retry-After": "1"})
        except Exception as e:  # noqa: BLE001 - the model failed on input that passed the checks: a server error, as JSON
            log.exception("inference failed")
            return error(500, f"inference failed: {type(e).__name__}: {str(e)[:200]}")
        finally:
            metrics.queue_depth.set(batcher.depth)
        body: dict[str, Any] = {"model_name": model.name, "model_version": "1", "outputs": []}
        if req_id is not None:
            body["id"] = req_id
        for spec, arr in zip(model.onnx.outputs, outs):
            if out_name is not None and spec.name != out_name:
                continue
            body["outputs"].append({"name": spec.name, "datatype": _V2_OF.get(arr.dtype.name, "FP32"), "shape": list(arr.shape),
                                    "data": arr.ravel().tolist()})
        return Response(json.dumps(body), media_type="application/json", headers=headers)

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue_depth.set(batcher.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class _Outputs:
    """All outputs of one batch; slicing takes the same rows of each (what the batcher hands each request)."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays

    def __getitem__(self, rows: slice) -> list[np.ndarray]:
        return [a[rows] for a in self.arrays]


def serve(settings: CloudServerSettings) -> None:
    """Run the server until interrupted."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    m = app.state.model
    log.info("serving %s (%s) on http://%s:%d with %s; batching up to %d rows, %d us, queue %d", settings.name, m.onnx.path.name,
             settings.host, settings.port, m.onnx.provider, settings.batch.max_batch, settings.batch.max_delay_us, settings.batch.max_queue)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
