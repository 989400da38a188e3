"""The KServe v2 gRPC endpoint: ``inference.GRPCInferenceService`` beside the REST routes, on the same repository.

The service definition and its generated stubs are the ones tritonclient ships
(``tritonclient.grpc.service_pb2``/``service_pb2_grpc``, the protocol's ``grpc_service.proto``),
so what Triton's own gRPC clients send is what this server parses. It runs on grpc.aio in the
server's event loop and feeds the same dynamic batchers as REST. Implemented: ServerLive,
ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer, ModelConfig,
ModelStatistics, RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload. The rest
(shared memory, tracing, logging, streaming) answer UNIMPLEMENTED, the gRPC form of a 404.
"""

from __future__ import annotations

import logging

import numpy as np

from hybrid_router.repository import ModelRepository, ServedModel, UnknownModel
from hybrid_router.tensors import V2_OF, BadInput, check_input, finish_input, from_bytes

__all__ = ["start_grpc"]

log = logging.getLogger("edgekit.cloud")

_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
             "UINT64": "uint64_contents", "BOOL": "bool_contents"}
_STATUS = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


def _servicer(repo: ModelRepository):
    import grpc
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

    from hybrid_router.server import InferFailure, infer_outputs

    async def fail(context, status: int, message: str):
        await context.abort(getattr(grpc.StatusCode, _STATUS.get(status, "INTERNAL")), message)

    async def model(context, name: str, version: str) -> ServedModel:
        try:
            return repo.get(name, version or None)
        except UnknownModel as e:
            await fail(context, 404, str(e))
            raise  # abort raises; this line is never reached

    def tensor_meta(t) -> service_pb2.ModelMetadataResponse.TensorMetadata:
        return service_pb2.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=V2_OF.get(t.dtype, t.dtype), shape=list(t.shape))

    class Service(service_pb2_grpc.GRPCInferenceServiceServicer):
        """GRPCInferenceService over the server's model repository."""

        async def ServerLive(self, request, context):
            return service_pb2.ServerLiveResponse(live=True)

        async def ServerReady(self, request, context):
            return service_pb2.ServerReadyResponse(ready=repo.ready)

        async def ModelReady(self, request, context):
            m = await model(context, request.name, request.version)
            return service_pb2.ModelReadyResponse(ready=m.ready)

        async def ServerMetadata(self, request, context):
            from edgekit import __version__

            return service_pb2.ServerMetadataResponse(name="edgekit-cloud", version=__version__,
                                                      extensions=["model_repository", "statistics", "model_configuration"])

        async def ModelMetadata(self, request, context):
            m = await model(context, request.name, request.version)
            if m.onnx is None:
                await fail(context, 503, f"model '{m.name}' version {m.version} is not loaded: {m.reason}")
            return service_pb2.ModelMetadataResponse(name=m.name, versions=repo.versions(m.name), platform="onnxruntime_onnx",
                                                     inputs=[tensor_meta(t) for t in m.onnx.inputs],
                                                     outputs=[tensor_meta(t) for t in m.onnx.outputs])

        async def ModelConfig(self, request, context):
            m = await model(context, request.name, request.version)
            if m.onnx is None:
                await fail(context, 503, f"model '{m.name}' version {m.version} is not loaded: {m.reason}")
            return service_pb2.ModelConfigResponse(config=json_format.ParseDict(m.config(), model_config_pb2.ModelConfig()))

        async def ModelStatistics(self, request, context):
            if request.name:
                await model(context, request.name, request.version)
                models = [repo.get(request.name, request.version)] if request.version else \
                    [repo.models[request.name][v] for v in repo.versions(request.name)]
            else:
                models = repo.all()
            stats = {"model_stats": [m.stats.as_dict(m.name, m.version) for m in models]}
            return json_format.ParseDict(stats, service_pb2.ModelStatisticsResponse())

        async def RepositoryIndex(self, request, context):
            return service_pb2.RepositoryIndexResponse(models=[service_pb2.RepositoryIndexResponse.ModelIndex(**e)
                                                               for e in repo.index(request.ready)])

        async def RepositoryModelLoad(self, request, context):
            try:
                models = await repo.load(request.model_name)
            except UnknownModel as e:
                await fail(context, 400, f"failed to load '{request.model_name}': {e}")
            failed = [m for m in models if not m.ready]
            if failed:
                await fail(context, 400, f"failed to load '{request.model_name}': " + "; ".join(f"version {m.version}: {m.reason}" for m in failed))
            return service_pb2.RepositoryModelLoadResponse()

        async def RepositoryModelUnload(self, request, context):
            try:
                await repo.unload(request.model_name)
            except UnknownModel as e:
                await fail(context, 400, f"failed to unload '{request.model_name}': {e}")
            return service_pb2.RepositoryModelUnloadResponse()

        async def ModelInfer(self, request, context):
            m = await model(context, request.model_name, request.model_version)
            if not m.ready:
                await fail(context, 503, f"model '{m.name}' version {m.version} is not ready: {m.reason or m.state.lower()}")
            try:
                x = _decode(request, m)
                specs = {o.name: o for o in m.onnx.outputs}
                names = [o.name for o in request.outputs] or list(specs)
                unknown = [n for n in names if n not in specs]
                if unknown:
                    raise BadInput(f"unknown output '{unknown[0]}'; the model's outputs: {', '.join(specs)}")
            except BadInput as e:
                await fail(context, 400, str(e))
            try:
                outs = await infer_outputs(m, x)
            except InferFailure as e:
                await fail(context, e.status, e.message)
            by_name = {spec.name: arr for spec, arr in zip(m.onnx.outputs, outs)}
            resp = service_pb2.ModelInferResponse(model_name=m.name, model_version=m.version, id=request.id)
            for n in names:
                arr = np.ascontiguousarray(by_name[n])
                resp.outputs.add(name=n, datatype=V2_OF.get(arr.dtype.name, "FP32"), shape=list(arr.shape))
                resp.raw_output_contents.append(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
            return resp

    return Service(), service_pb2_grpc


def _decode(request, m: ServedModel) -> np.ndarray:
    """The input array of a ModelInferRequest: raw_input_contents, or the typed contents field."""
    if len(request.inputs) != 1:
        raise BadInput(f"the model takes 1 input, the request has {len(request.inputs)}")
    tin = request.inputs[0]
    shape = list(tin.shape)
    dtype = check_input(m.input, tin.name, tin.datatype, shape)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise BadInput(f"{len(request.raw_input_contents)} raw input contents for 1 input")
        return from_bytes(request.raw_input_contents[0], dtype, shape)
    field = _CONTENTS.get(tin.datatype)
    values = list(getattr(tin.contents, field)) if field else []
    try:
        x = np.asarray(values, dtype=dtype)
    except (ValueError, OverflowError):
        raise BadInput(f"input contents do not fit {tin.datatype}") from None
    return finish_input(x, shape)


async def start_grpc(repo: ModelRepository, host: str, port: int):
    """Start the gRPC server on the running event loop; returns it (``await server.stop(grace)`` to stop)."""
    import grpc

    service, stubs = _servicer(repo)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 * 1024 * 1024),
                                      ("grpc.max_send_message_length", 256 * 1024 * 1024)])
    stubs.add_GRPCInferenceServiceServicer_to_server(service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"gRPC cannot listen on {host}:{port}")
    await server.start()
    log.info("gRPC GRPCInferenceService on %s:%d", host, bound)
    return server
