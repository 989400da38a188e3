"""A KServe v2 (Open Inference Protocol) REST client with a hard per-request deadline.

The protocol is the one Triton, KServe and MLServer speak, and ``edgekit cloud serve``:
``POST {url}/v2/models/{name}[/versions/{v}]/infer`` with ``{"inputs": [{"name", "shape",
"datatype", "data"}]}``. By default the input goes as raw bytes after the JSON header (the binary
tensor extension Triton and ``edgekit cloud serve`` accept): formatting 784 floats as JSON text
costs more than the rest of the router together; ``binary=False`` sends plain JSON ``data``.

httpx times each phase (connect, write, read) separately and has no
total timeout, so every call runs on a small worker pool and the caller waits at most until
the deadline: a server that trickles bytes cannot hold the caller past it. Each attempt also
gets httpx timeouts of the time left plus a short grace, so abandoned workers end soon after.

At most one retry, and only inside the deadline, only for failures a second try can fix
(connection refused or dropped, HTTP 500/502). Timeouts, overload (429/503) and malformed
answers are not retried.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["CloudFailure", "CloudResult", "FailureReason", "KServeClient", "DATATYPES"]

FailureReason = Literal["timeout", "unreachable", "overloaded", "bad_response", "circuit_open"]

# KServe v2 tensor datatypes <-> NumPy
DATATYPES: dict[str, str] = {"FP32": "float32", "FP64": "float64", "FP16": "float16", "INT8": "int8", "UINT8": "uint8",
                             "INT16": "int16", "INT32": "int32", "INT64": "int64", "BOOL": "bool"}
_NP_TO_V2 = {v: k for k, v in DATATYPES.items()}
_WORKER_GRACE_S = 0.25


class CloudFailure(Exception):
    """The cloud did not give a usable answer; ``reason`` is one of :data:`FailureReason`."""

    def __init__(self, reason: FailureReason, detail: str, *, retryable: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: FailureReason = reason
        self.detail = detail
        self.retryable = retryable


@dataclass(frozen=True)
class CloudResult:
    """A good answer: the first (or named) output, and what the server said about itself."""

    outputs: np.ndarray
    attempts: int
    provider: str | None


class KServeClient:
    """Calls one model on a KServe v2 REST server; thread-safe."""

    def __init__(self, url: str, model: str, *, version: str | None = None, input_name: str | None = None,
                 output_name: str | None = None, binary: bool = True, min_retry_ms: float = 5.0, max_workers: int = 16) -> None:
        import httpx  # the router's one HTTP client; imported here so the package imports without it

        self._httpx = httpx
        self.url = url.rstrip("/")
        self.model = model
        base = f"{self.url}/v2/models/{model}" + (f"/versions/{version}" if version else "")
        self._infer_url = f"{base}/infer"
        self._meta_url = base
        self.input_name = input_name
        self.output_name = output_name
        self.binary = binary
        self.min_retry_ms = min_retry_ms
        limits = httpx.Limits(max_connections=max_workers, max_keepalive_connections=max_workers)
        self._http = httpx.Client(limits=limits, headers={"content-type": "application/json"})
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kserve-client")
        self._meta_lock = threading.Lock()

    def close(self) -> None:
        """Release connections; abandoned calls are not waited for."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def __enter__(self) -> KServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def infer(self, x: np.ndarray, deadline: float) -> CloudResult:
        """Outputs for batch ``x``; ``deadline`` is a ``time.monotonic()`` instant. Raises :class:`CloudFailure`."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CloudFailure("timeout", "no time left for the cloud")
        try:
            future = self._pool.submit(self._attempts, np.ascontiguousarray(x), deadline)
        except RuntimeError as e:  # pool shut down
            raise CloudFailure("unreachable", f"client closed ({e})") from None
        try:
            return future.result(timeout=remaining)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise CloudFailure("timeout", f"no answer within the deadline ({remaining * 1000:.0f} ms left at the call)") from None

    def metadata(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The model's metadata (``GET /v2/models/{name}``)."""
        try:
            r = self._http.get(self._meta_url, timeout=timeout_s)
        except self._httpx.HTTPError as e:
            raise self._transport_failure(e) from None
        if r.status_code != 200:
            raise self._status_failure(r)
        try:
            meta = r.json()
            meta["inputs"][0]["name"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise CloudFailure("bad_response", "model metadata is not KServe v2 JSON") from None
        return meta

    # -- worker side ---------------------------------------------------------------------------

    def _attempts(self, x: np.ndarray, deadline: float) -> CloudResult:
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._once(x, deadline, attempt)
            except CloudFailure as e:
                left_ms = (deadline - time.monotonic()) * 1000
                if attempt >= 2 or not e.retryable or left_ms < self.min_retry_ms:
                    raise

    def _timeout(self, deadline: float):
        left = deadline - time.monotonic()
        if left <= 0:
            raise CloudFailure("timeout", "deadline passed")
        # The caller stops waiting at the deadline; the worker's own timeout fires a little later, so the two do
        # not wake together and the abandoned worker's clean-up never competes with the caller for the GIL.
        return self._httpx.Timeout(left + _WORKER_GRACE_S)

    def _once(self, x: np.ndarray, deadline: float, attempt: int) -> CloudResult:
        if self.input_name is None:
            with self._meta_lock:
                if self.input_name is None:
                    meta = self.metadata(timeout_s=max(0.001, deadline - time.monotonic()))
                    self.input_name = meta["inputs"][0]["name"]
        dtype = _NP_TO_V2.get(x.dtype.name)
        if dtype is None:
            raise CloudFailure("bad_response", f"dtype {x.dtype} has no KServe v2 datatype")
        tensor: dict[str, Any] = {"name": self.input_name, "shape": list(x.shape), "datatype": dtype}
        body: dict[str, Any] = {"inputs": [tensor]}
        if self.output_name:
            body["outputs"] = [{"name": self.output_name}]
        if self.binary:
            raw = x.tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            header = json.dumps(body).encode()
            content, headers = header + raw, {"inference-header-content-length": str(len(header)),
                                              "content-type": "application/octet-stream"}
        else:
            tensor["data"] = x.ravel().tolist()
            content, headers = json.dumps(body).encode(), None
        try:
            r = self._http.post(self._infer_url, content=content, headers=headers, timeout=self._timeout(deadline))
        except self._httpx.HTTPError as e:
            raise self._transport_failure(e) from None
        if r.status_code != 200:
            raise self._status_failure(r)
        return CloudResult(self._parse(r, len(x)), attempt, r.headers.get("x-edgekit-provider"))

    def _parse(self, r, batch: int) -> np.ndarray:
        try:
            payload = r.json()
            outs = payload["outputs"]
            out = next((o for o in outs if o["name"] == self.output_name), None) if self.output_name else outs[0]
            if out is None:
                raise KeyError(self.output_name)
            dtype = DATATYPES[out["datatype"]]
            arr = np.asarray(out["data"], dtype=dtype).reshape([int(s) for s in out["shape"]])
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise CloudFailure("bad_response", f"not a KServe v2 inference response ({type(e).__name__}: {str(e)[:80]})") from None
        if arr.ndim < 2 or arr.shape[0] != batch:
            raise CloudFailure("bad_response", f"output shape {arr.shape} does not answer a batch of {batch}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise CloudFailure("bad_response", "output holds NaN or infinity")
        return arr.astype(np.float32, copy=False)

    def _transport_failure(self, e: Exception) -> CloudFailure:
        httpx = self._httpx
        if isinstance(e, httpx.TimeoutException):
            return CloudFailure("timeout", f"{type(e).__name__}")
        if isinstance(e, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            return CloudFailure("unreachable", f"{type(e).__name__}: {str(e)[:120]}", retryable=True)
        return CloudFailure("unreachable", f"{type(e).__name__}: {str(e)[:120]}")

    @staticmethod
    def _status_failure(r) -> CloudFailure:
        code = r.status_code
        try:
            msg = str(r.json().get("error", ""))[:160]
        except (ValueError, AttributeError):
            msg = r.text[:160]
        detail = f"HTTP {code}" + (f": {msg}" if msg else "")
        if code in (429, 503):
            return CloudFailure("overloaded", detail)
        if code == 504:
            return CloudFailure("timeout", detail)
        if code == 502:
            return CloudFailure("unreachable", detail, retryable=True)
        return CloudFailure("bad_response", detail, retryable=code == 500)
