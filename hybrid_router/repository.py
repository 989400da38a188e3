"""The cloud server's model repository: several models and versions, each loaded, warmed up and batched on its own.

A model is ``LOADING`` while ONNX Runtime opens it and warm-up runs (batch 1 and ``max_batch``),
``READY`` after, ``UNAVAILABLE`` with a reason when loading or warm-up failed, or after an unload.
Warm-up needs a concrete shape: free axes beyond the batch are filled from the configured
warm-up shape, else from the model's own hint (ONNX metadata ``edgekit.warmup_shape``, e.g.
``1x3x320x320``); with neither, the model is ``UNAVAILABLE`` and says which axes are free and
how to give a shape; it never wedges. A request without a version goes to the highest ready one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hybrid_router.batcher import BatchConfig, BatchStats, DynamicBatcher
from hybrid_router.tensors import V2_OF

__all__ = ["ModelRepository", "ModelSpec", "ModelStats", "ServedModel", "UnknownModel", "WARMUP_HINT_KEY"]

log = logging.getLogger("edgekit.cloud")
WARMUP_HINT_KEY = "edgekit.warmup_shape"
_WARMUP_TIMEOUT_S = 300.0


class UnknownModel(Exception):
    """No such model or version in the repository (HTTP 404, gRPC NOT_FOUND)."""


@dataclass(frozen=True)
class ModelSpec:
    """One model version the server can load: its name, version, ONNX (or .keras) file and warm-up shape."""

    name: str
    path: str
    version: str = "1"
    warmup_shape: tuple[int, ...] | None = None


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.ns += int(seconds * 1e9)

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class ModelStats:
    """Triton-style inference statistics of one model version (``/v2/models/{name}/stats``)."""

    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, _Duration] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_batch(self, s: BatchStats) -> None:
        with self.lock:
            self.execution_count += 1
            self.inference_count += s.rows
            self.queue.add(s.queue_wait_s, s.requests)
            self.compute_infer.add(s.run_s, s.requests)
            self.batches.setdefault(s.rows, _Duration()).add(s.run_s)

    def on_request(self, ok: bool, seconds: float) -> None:
        with self.lock:
            (self.success if ok else self.fail).add(seconds)
            self.last_inference_ms = int(time.time() * 1000)

    def as_dict(self, name: str, version: str) -> dict[str, Any]:
        zero = {"count": 0, "ns": 0}
        with self.lock:
            return {"name": name, "version": version, "last_inference": self.last_inference_ms, "inference_count": self.inference_count,
                    "execution_count": self.execution_count,
                    "inference_stats": {"success": self.success.as_dict(), "fail": self.fail.as_dict(), "queue": self.queue.as_dict(),
                                        "compute_input": zero, "compute_infer": self.compute_infer.as_dict(), "compute_output": zero,
                                        "cache_hit": zero, "cache_miss": zero},
                    "batch_stats": [{"batch_size": b, "compute_input": zero, "compute_infer": d.as_dict(), "compute_output": zero}
                                    for b, d in sorted(self.batches.items())]}


class _Outputs:
    """All outputs of one batch; slicing takes the same rows of each (what the batcher hands each request)."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays

    def __getitem__(self, rows: slice) -> list[np.ndarray]:
        return [a[rows] for a in self.arrays]


class ServedModel:
    """One model version: its ONNX Runtime session, batcher, state and statistics."""

    def __init__(self, spec: ModelSpec, batch: BatchConfig, providers: tuple[str, ...] | None, require: bool,
                 threads: int | None, on_batch) -> None:
        self.spec = spec
        self.name, self.version = spec.name, spec.version
        self.state = "UNAVAILABLE"
        self.reason = "not loaded"
        self.onnx = None
        self.batcher: DynamicBatcher | None = None
        self.stats = ModelStats()
        self._batch = batch
        self._providers, self._require, self._threads = providers, require, threads
        self._on_batch = on_batch

    @property
    def ready(self) -> bool:
        return self.state == "READY"

    @property
    def input(self):
        return self.onnx.inputs[0]

    @property
    def provider(self) -> str | None:
        return self.onnx.provider if self.onnx is not None else None

    def load_session(self) -> None:
        """Open the ONNX Runtime session (blocking; run it off the event loop)."""
        from hybrid_router.cloud_model import OnnxCloudModel

        self.onnx = OnnxCloudModel(self.spec.path, providers=list(self._providers) if self._providers else None, require=self._require,
                                   intra_op_threads=self._threads)
        if self.onnx.requested[0] != self.onnx.provider:
            log.warning("%s: asked for %s, ONNX Runtime runs the model on %s", self.name, self.onnx.requested[0], self.onnx.provider)

    def warmup_shape(self) -> tuple[int, ...] | str:
        """The shape of one warm-up row (without the batch axis), or why there is none."""
        dims = self.input.shape[1:]
        free = [i + 1 for i, d in enumerate(dims) if d < 0]
        if not free:
            return tuple(dims)
        for where, hint in (("--warmup-shape", self.spec.warmup_shape), (f"the model's {WARMUP_HINT_KEY} metadata", self._model_hint())):
            if hint is None:
                continue
            if len(hint) != len(self.input.shape) or any(d >= 0 and h != d for h, d in zip(hint[1:], dims)):
                return f"{where} {'x'.join(map(str, hint))} does not fit the input shape {list(self.input.shape)}"
            return tuple(hint[1:])
        return (f"input '{self.input.name}' has free axes {free} (shape {list(self.input.shape)}) and no warm-up shape: pass "
                f"--warmup-shape {self.name}=1x... or store '{WARMUP_HINT_KEY}' in the ONNX model's metadata")

    def _model_hint(self) -> tuple[int, ...] | None:
        from hybrid_router.tensors import parse_shape

        text = self.onnx.session.get_modelmeta().custom_metadata_map.get(WARMUP_HINT_KEY)
        if not text:
            return None
        try:
            return parse_shape(text)
        except ValueError:
            log.warning("%s: ignoring %s=%r (not a shape)", self.name, WARMUP_HINT_KEY, text)
            return None

    def run(self, x: np.ndarray) -> _Outputs:
        return _Outputs(self.onnx.session.run(None, {self.input.name: x}))

    async def load(self) -> None:
        """Load, warm up, and become READY; on any failure UNAVAILABLE with the reason. Never raises."""
        self.state, self.reason = "LOADING", ""
        loop = asyncio.get_running_loop()
        try:
            if self.onnx is None:  # ``serve`` opens sessions before start-up, so a bad file is a CLI error
                await loop.run_in_executor(None, self.load_session)
        except Exception as e:  # noqa: BLE001 - an unloadable model is unavailable, the server stays up
            self.state, self.reason = "UNAVAILABLE", f"cannot load {self.spec.path}: {getattr(e, 'message', str(e))[:300]}"
            log.error("%s v%s: %s", self.name, self.version, self.reason)
            return
        static = self.input.shape[0] if self.input.shape and self.input.shape[0] > 0 else None
        batch = self._batch
        if static is not None and batch.max_batch != 1:
            # a graph with a fixed batch axis takes exactly that many rows: no batching across requests
            log.warning("%s: model input has a fixed batch of %d; serving request by request", self.name, static)
            batch = BatchConfig(1, batch.max_delay_us, batch.max_queue)
        self.batcher = DynamicBatcher(self.run, batch, on_batch=self._batch_done)
        await self.batcher.start()
        shape = self.warmup_shape()
        if isinstance(shape, str):
            self.state, self.reason = "UNAVAILABLE", shape
            log.error("%s v%s not ready: %s", self.name, self.version, shape)
            return
        sizes = [static] if static is not None else sorted({1, batch.max_batch})
        try:
            for n in sizes:
                for _ in range(3):
                    x = np.zeros([n, *shape], dtype=np.dtype(self.input.dtype))
                    await asyncio.wait_for(self.batcher.run_direct(x), _WARMUP_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - stay live and unready, and say why
            self.state = "UNAVAILABLE"
            self.reason = f"warm-up at shape {[sizes[0], *shape]} failed: {type(e).__name__}: {str(e)[:300]}"
            log.error("%s v%s not ready: %s", self.name, self.version, self.reason)
            return
        self.state, self.reason = "READY", ""
        log.info("model %s v%s warm on %s; ready", self.name, self.version, self.onnx.provider)

    async def unload(self) -> None:
        """Stop serving: queued requests fail, the session is released."""
        self.state, self.reason = "UNAVAILABLE", "unloaded"
        if self.batcher is not None:
            await self.batcher.stop()
        self.batcher, self.onnx = None, None

    def _batch_done(self, s: BatchStats) -> None:
        self.stats.on_batch(s)
        self._on_batch(s)

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        """KServe v2 model metadata."""
        def t(i) -> dict[str, Any]:
            return {"name": i.name, "datatype": V2_OF.get(i.dtype, i.dtype), "shape": list(i.shape)}

        return {"name": self.name, "versions": versions, "platform": "onnxruntime_onnx",
                "inputs": [t(i) for i in self.onnx.inputs], "outputs": [t(o) for o in self.onnx.outputs],
                "parameters": {"execution_provider": self.onnx.provider, "providers": self.onnx.providers,
                               "requested_providers": self.onnx.requested, "model_file": self.onnx.path.name}}

    def config(self) -> dict[str, Any]:
        """The model's configuration in Triton's ModelConfig JSON form (what ``/config`` answers)."""
        from hybrid_router.triton import TRITON_TYPES

        batching = self.input.shape[0] == -1

        def t(i) -> dict[str, Any]:
            return {"name": i.name, "data_type": TRITON_TYPES.get(i.dtype, "TYPE_INVALID"),
                    "dims": list(i.shape[1:] if batching else i.shape)}

        b = self.batcher.config if self.batcher is not None else self._batch
        cfg: dict[str, Any] = {"name": self.name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
                               "max_batch_size": b.max_batch if batching else 0,
                               "input": [t(i) for i in self.onnx.inputs], "output": [t(o) for o in self.onnx.outputs],
                               "version_policy": {"specific": {"versions": [int(self.version)] if self.version.isdigit() else []}},
                               "instance_group": [{"count": 1, "kind": "KIND_GPU" if "CUDA" in self.onnx.provider else "KIND_CPU"}]}
        if batching and b.max_batch > 1:
            cfg["dynamic_batching"] = {"max_queue_delay_microseconds": b.max_delay_us,
                                       "default_queue_policy": {"max_queue_size": b.max_queue}}
        return cfg


def _version_key(v: str) -> tuple[int, int | str]:
    return (1, int(v)) if v.isdigit() else (0, v)


class ModelRepository:
    """Every model version the server knows, by name and version."""

    def __init__(self, specs: list[ModelSpec], batch: BatchConfig, *, providers: tuple[str, ...] | None = None, require: bool = False,
                 threads: int | None = None, on_batch=lambda _s: None) -> None:
        self.models: dict[str, dict[str, ServedModel]] = {}
        for s in specs:
            versions = self.models.setdefault(s.name, {})
            if s.version in versions:
                raise ValueError(f"model {s.name} version {s.version} is given twice")
            versions[s.version] = ServedModel(s, batch, providers, require, threads, on_batch)
        self._lock = asyncio.Lock()

    def versions(self, name: str) -> list[str]:
        return sorted(self.models.get(name, {}), key=_version_key)

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The model version asked for; without a version the highest ready one (else the highest). UnknownModel if none."""
        versions = self.models.get(name)
        if not versions:
            raise UnknownModel(f"unknown model '{name}'; this server serves: {', '.join(sorted(self.models)) or 'nothing'}")
        if version is not None and version != "":
            if version not in versions:
                raise UnknownModel(f"unknown version '{version}' of '{name}'; versions: {', '.join(self.versions(name))}")
            return versions[version]
        ordered = [versions[v] for v in self.versions(name)]
        ready = [m for m in ordered if m.ready]
        return (ready or ordered)[-1]

    def all(self) -> list[ServedModel]:
        return [m for name in sorted(self.models) for m in (self.models[name][v] for v in self.versions(name))]

    @property
    def ready(self) -> bool:
        """Server readiness: every model version is ready."""
        return all(m.ready for m in self.all())

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """``/v2/repository/index``: name, version, state and reason of every model version."""
        return [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
                for m in self.all() if not ready_only or m.ready]

    async def load_all(self) -> None:
        await asyncio.gather(*(m.load() for m in self.all()))

    async def load(self, name: str) -> list[ServedModel]:
        """(Re)load every version of ``name``."""
        self.get(name)
        async with self._lock:
            for m in self.models[name].values():
                if m.ready:
                    await m.unload()
            await asyncio.gather(*(m.load() for m in self.models[name].values()))
            return list(self.models[name].values())

    async def unload(self, name: str) -> None:
        self.get(name)
        async with self._lock:
            for m in self.models[name].values():
                await m.unload()

    async def stop(self) -> None:
        for m in self.all():
            if m.batcher is not None:
                await m.batcher.stop()
