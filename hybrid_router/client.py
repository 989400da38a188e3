"""A KServe v2 (Open Inference Protocol) REST client with a hard per-request deadline and a checked answer.

The protocol is the one Triton, KServe and MLServer speak, and ``edgekit cloud serve``:
``POST {url}/v2/models/{name}[/versions/{v}]/infer`` with ``{"inputs": [{"name", "shape",
"datatype", "data"}]}``. By default the input goes as raw bytes after the JSON header (the binary
tensor extension Triton and ``edgekit cloud serve`` accept): formatting 784 floats as JSON text
costs more than the rest of the router together; ``binary=False`` sends plain JSON ``data``.

Nothing the cloud sends is used unchecked. The model's metadata is read once (and again after a
mismatch) and fixes the *contract*: the output's name, datatype and class count, which must
match the device model's classes (``classes``). Every answer must then name that model and that
output, have shape ``[batch, classes]``, that datatype, and finite values that fit it; anything
else is ``bad_response``. The body is read as a stream: at most a few bytes per expected value
(more is ``bad_response`` before it is parsed), and reading stops at the deadline, so neither a
huge nor a trickling answer holds the caller, nor the worker, past it.

httpx times each phase (connect, write, read) separately and has no total timeout, so every call
runs on a small worker pool and the caller waits at most until the deadline.

At most one retry, and only inside the deadline, only for failures a second try can fix
(connection refused or dropped, HTTP 500/502). Timeouts, overload (429/503) and malformed
answers are not retried. No exception other than :class:`CloudFailure` leaves ``infer``.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["CloudContract", "CloudFailure", "CloudResult", "FailureReason", "KServeClient", "DATATYPES"]

log = logging.getLogger(__name__)

FailureReason = Literal["timeout", "unreachable", "overloaded", "bad_response", "circuit_open"]

# KServe v2 tensor datatypes <-> NumPy
DATATYPES: dict[str, str] = {"FP32": "float32", "FP64": "float64", "FP16": "float16", "INT8": "int8", "UINT8": "uint8",
                             "INT16": "int16", "INT32": "int32", "INT64": "int64", "UINT16": "uint16", "UINT32": "uint32",
                             "UINT64": "uint64", "BOOL": "bool"}
_NP_TO_V2 = {v: k for k, v in DATATYPES.items()}
_NUMERIC = {k for k in DATATYPES if k != "BOOL"}
_WORKER_GRACE_S = 0.25
_HEADER_ALLOWANCE = 64 * 1024
"""Bytes an answer may take beyond its values: JSON keys, names, parameters."""
_JSON_BYTES_PER_VALUE = 32
"""The longest JSON number a float64 needs is 24 characters ("-2.2250738585072014e-308") plus ", "."""


class CloudFailure(Exception):
    """The cloud did not give a usable answer; ``reason`` is one of :data:`FailureReason`."""

    def __init__(self, reason: FailureReason, detail: str, *, retryable: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: FailureReason = reason
        self.detail = detail
        self.retryable = retryable


@dataclass(frozen=True)
class CloudResult:
    """A good answer: the contract's output as float32 ``[batch, classes]``, and what the server said about itself."""

    outputs: np.ndarray
    attempts: int
    provider: str | None


@dataclass(frozen=True)
class CloudContract:
    """What the cloud model's metadata promises and the device model needs: the tensors and the class count."""

    model: str
    input_name: str
    input_datatype: str
    output_name: str
    output_datatype: str
    classes: int


class _Incompatible(CloudFailure):
    """The cloud model cannot answer for the device model (another class count, no usable output)."""

    def __init__(self, detail: str) -> None:
        super().__init__("bad_response", detail)


class KServeClient:
    """Calls one model on a KServe v2 REST server; thread-safe.

    ``classes``: how many classes the device model has; the cloud model's output must have as
    many (the classifier sets it from the device model when it is not given).
    """

    def __init__(self, url: str, model: str, *, version: str | None = None, input_name: str | None = None,
                 output_name: str | None = None, binary: bool = True, classes: int | None = None, min_retry_ms: float = 5.0,
                 max_workers: int = 16) -> None:
        import httpx  # the router's one HTTP client; imported here so the package imports without it

        self._httpx = httpx
        self.url = url.rstrip("/")
        self.model = model
        self.version = version
        base = f"{self.url}/v2/models/{model}" + (f"/versions/{version}" if version else "")
        self._infer_url = f"{base}/infer"
        self._meta_url = base
        self.input_name = input_name
        self.output_name = output_name
        self.binary = binary
        self.classes = classes
        self.min_retry_ms = min_retry_ms
        limits = httpx.Limits(max_connections=max_workers, max_keepalive_connections=max_workers)
        self._http = httpx.Client(limits=limits, headers={"content-type": "application/json"})
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kserve-client")
        self._meta_lock = threading.Lock()
        self._contract: CloudContract | None = None

    def require_classes(self, classes: int) -> None:
        """Tie the client to a device model with ``classes`` classes (set once; a different count is a ValueError)."""
        if self.classes is None:
            with self._meta_lock:
                self.classes, self._contract = int(classes), None  # a contract read before must be checked against them
        elif self.classes != classes:
            raise ValueError(f"this client expects {self.classes} classes, the device model has {classes}")

    def close(self) -> None:
        """Release connections; abandoned calls are not waited for."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def __enter__(self) -> KServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def infer(self, x: np.ndarray, deadline: float) -> CloudResult:
        """Outputs for batch ``x``; ``deadline`` is a ``time.monotonic()`` instant. Raises only :class:`CloudFailure`."""
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
        except CloudFailure:
            raise
        except Exception as e:  # noqa: BLE001 - the contract: nothing but CloudFailure leaves the client
            log.warning("cloud client failed unexpectedly: %s: %s", type(e).__name__, e)
            raise CloudFailure("bad_response", f"{type(e).__name__}: {str(e)[:120]}") from None

    def metadata(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The model's metadata (``GET /v2/models/{name}``), checked to be KServe v2 model metadata."""
        try:
            r = self._http.get(self._meta_url, timeout=timeout_s)
        except self._httpx.HTTPError as e:
            raise self._transport_failure(e) from None
        if r.status_code != 200:
            raise _failure_from_status(r.status_code, r.content)
        if len(r.content) > 4 * 1024 * 1024:
            raise CloudFailure("bad_response", f"model metadata of {len(r.content)} bytes")
        try:
            meta = r.json()
            meta["inputs"][0]["name"]
            meta["outputs"][0]["name"]
        except (ValueError, KeyError, IndexError, TypeError, RecursionError):
            raise CloudFailure("bad_response", "model metadata is not KServe v2 JSON (needs 'inputs' and 'outputs')") from None
        return meta

    def contract(self, timeout_s: float = 5.0) -> CloudContract:
        """The checked contract (reads the metadata once); :class:`CloudFailure` when the model cannot serve the device's classes."""
        with self._meta_lock:
            if self._contract is None:
                self._contract = self._make_contract(self.metadata(timeout_s))
            return self._contract

    def _make_contract(self, meta: dict[str, Any]) -> CloudContract:
        name = meta.get("name")
        if name is not None and name != self.model:
            raise _Incompatible(f"the server describes model '{name}', not '{self.model}'")
        inputs = meta["inputs"]
        tin = next((t for t in inputs if t.get("name") == self.input_name), None) if self.input_name else inputs[0]
        if tin is None:
            raise _Incompatible(f"the cloud model has no input '{self.input_name}' ({', '.join(str(t.get('name')) for t in inputs)})")
        outputs = meta["outputs"]
        out = next((t for t in outputs if t.get("name") == self.output_name), None) if self.output_name else outputs[0]
        if out is None:
            raise _Incompatible(f"the cloud model has no output '{self.output_name}' ({', '.join(str(t.get('name')) for t in outputs)})")
        datatype, shape = out.get("datatype"), out.get("shape")
        if datatype not in _NUMERIC:
            raise _Incompatible(f"output '{out['name']}' has datatype {datatype!r}, not a number type")
        if not isinstance(shape, list) or len(shape) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise _Incompatible(f"output '{out['name']}' has shape {shape!r}; a classifier answers [batch, classes]")
        classes = shape[1]
        if classes < 1:
            if self.classes is None:
                raise _Incompatible(f"output '{out['name']}' has a free class axis {shape} and the device's class count is unknown")
            classes = self.classes
        if self.classes is not None and classes != self.classes:
            raise _Incompatible(f"the cloud model answers {classes} classes, the device model has {self.classes}")
        return CloudContract(self.model, str(tin["name"]), str(tin.get("datatype", "")), str(out["name"]), datatype, int(classes))

    def forget_contract(self) -> None:
        """Read the metadata again before the next call (after the cloud model may have changed)."""
        with self._meta_lock:
            self._contract = None

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
        c = self.contract(timeout_s=max(0.001, deadline - time.monotonic()))
        dtype = _NP_TO_V2.get(x.dtype.name)
        if dtype is None:
            raise CloudFailure("bad_response", f"dtype {x.dtype} has no KServe v2 datatype")
        tensor: dict[str, Any] = {"name": c.input_name, "shape": list(x.shape), "datatype": dtype}
        body: dict[str, Any] = {"inputs": [tensor], "outputs": [{"name": c.output_name}]}
        if self.binary:
            raw = x.tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            header = json.dumps(body).encode()
            content, headers = header + raw, {"inference-header-content-length": str(len(header)),
                                              "content-type": "application/octet-stream"}
        else:
            tensor["data"] = x.ravel().tolist()
            content, headers = json.dumps(body).encode(), None
        itemsize = np.dtype(DATATYPES[c.output_datatype]).itemsize
        limit = _HEADER_ALLOWANCE + len(x) * c.classes * max(itemsize, _JSON_BYTES_PER_VALUE)
        try:
            with self._http.stream("POST", self._infer_url, content=content, headers=headers, timeout=self._timeout(deadline)) as r:
                if r.status_code != 200:
                    try:
                        error_body = self._read_bounded(r, _HEADER_ALLOWANCE, deadline)
                    except CloudFailure:
                        error_body = b""
                    raise _failure_from_status(r.status_code, error_body)
                raw_body = self._read_bounded(r, limit, deadline)
        except self._httpx.HTTPError as e:
            raise self._transport_failure(e) from None
        try:
            out = self._parse(raw_body, r.headers.get("inference-header-content-length"), len(x), c)
        except CloudFailure:
            self.forget_contract()  # the model behind the URL may have changed: check its metadata again next time
            raise
        return CloudResult(out, attempt, r.headers.get("x-edgekit-provider"))

    def _transport_failure(self, e: Exception) -> CloudFailure:
        return _failure_from_transport(self._httpx, e)

    def _read_bounded(self, r, limit: int, deadline: float) -> bytes:
        declared = r.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise CloudFailure("bad_response", f"answer of {int(declared)} bytes; at most {limit} expected for this shape")
        parts: list[bytes] = []
        n = 0
        for chunk in r.iter_raw():  # as the bytes arrive (a chunk size would wait for that many)
            n += len(chunk)
            if n > limit:
                raise CloudFailure("bad_response", f"answer larger than the {limit} bytes expected for this shape")
            if time.monotonic() > deadline:
                raise CloudFailure("timeout", f"answer still arriving at the deadline ({n} bytes read)")
            parts.append(chunk)
        if r.headers.get("content-encoding", "identity") not in ("identity", ""):
            raise CloudFailure("bad_response", f"content-encoding {r.headers['content-encoding']} is not accepted")
        return b"".join(parts)

    def _parse(self, body: bytes, header_length: str | None, batch: int, c: CloudContract) -> np.ndarray:
        binary = b""
        if header_length is not None:
            if not header_length.isdigit() or not 0 < int(header_length) <= len(body):
                raise CloudFailure("bad_response", f"Inference-Header-Content-Length {header_length[:20]!r} does not fit the body")
            body, binary = body[: int(header_length)], body[int(header_length):]
        try:
            payload = json.loads(body)
            outs = payload["outputs"]
            if not isinstance(outs, list):
                raise TypeError("'outputs' is not a list")
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise CloudFailure("bad_response", f"not a KServe v2 inference response ({type(e).__name__}: {str(e)[:80]})") from None
        name = payload.get("model_name")
        if name is not None and name != c.model:
            raise CloudFailure("bad_response", f"the answer comes from model '{str(name)[:60]}', not '{c.model}'")
        out = next((o for o in outs if isinstance(o, dict) and o.get("name") == c.output_name), None)
        if out is None:
            names = [str(o.get("name"))[:40] for o in outs if isinstance(o, dict)][:5]
            raise CloudFailure("bad_response", f"the answer has outputs {names}, not the model's '{c.output_name}'")
        if out.get("datatype") != c.output_datatype:
            raise CloudFailure("bad_response", f"output datatype {str(out.get('datatype'))[:20]!r}, the model's metadata says {c.output_datatype}")
        want = [batch, c.classes]
        if out.get("shape") != want:
            raise CloudFailure("bad_response", f"output shape {str(out.get('shape'))[:40]} does not answer {batch} inputs of "
                                               f"{c.classes} classes")
        dtype = np.dtype(DATATYPES[c.output_datatype])
        size = batch * c.classes
        params = out.get("parameters") or {}
        if isinstance(params, dict) and "binary_data_size" in params:
            n = params["binary_data_size"]
            if n != size * dtype.itemsize or n != len(binary):
                raise CloudFailure("bad_response", f"binary output of {n!r} bytes ({len(binary)} sent); {size * dtype.itemsize} expected")
            arr = np.frombuffer(binary, dtype=dtype.newbyteorder("<")).astype(np.float64)
        else:
            arr = _json_values(out.get("data"), size, dtype)
        if not np.isfinite(arr).all():
            raise CloudFailure("bad_response", "output holds NaN or infinity")
        return arr.reshape(want).astype(np.float32)


def _json_values(data: Any, size: int, dtype: np.dtype) -> np.ndarray:
    """The JSON ``data`` of an output as float64, checked: flat or nested numbers, ``size`` of them, each fitting ``dtype``."""
    if not isinstance(data, list):
        raise CloudFailure("bad_response", "output has no 'data' list")
    flat: list[Any] = data
    if data and isinstance(data[0], list):  # nested row-major form, as Triton also accepts
        flat = [v for row in data if isinstance(row, list) for v in row]
    if len(flat) != size:
        raise CloudFailure("bad_response", f"output has {len(flat)} values, {size} expected")
    integer = dtype.kind in "iu"
    lo, hi = (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)) if integer else (0, 0)
    for v in flat:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise CloudFailure("bad_response", f"output value {str(v)[:20]!r} is not a number")
        if integer and (not isinstance(v, int) or not lo <= v <= hi):
            raise CloudFailure("bad_response", f"output value {str(v)[:24]} does not fit {dtype.name}")
        if isinstance(v, float) and not math.isfinite(v):
            raise CloudFailure("bad_response", "output holds NaN or infinity")
    try:
        return np.asarray(flat, dtype=np.float64)
    except (OverflowError, ValueError, TypeError) as e:
        raise CloudFailure("bad_response", f"output values do not convert ({type(e).__name__})") from None


def _status_detail(body: bytes) -> str:
    try:
        payload = json.loads(body)
        msg = str(payload.get("error", "")) if isinstance(payload, dict) else ""
    except (ValueError, RecursionError):
        msg = body[:160].decode("utf-8", "replace")
    return msg[:160]


def _transport_reason(httpx, e: Exception) -> tuple[FailureReason, bool]:
    if isinstance(e, httpx.TimeoutException):
        return "timeout", False
    if isinstance(e, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return "unreachable", True
    return "unreachable", False


def _status_reason(code: int) -> tuple[FailureReason, bool]:
    if code in (429, 503):
        return "overloaded", False
    if code == 504:
        return "timeout", False
    if code == 502:
        return "unreachable", True
    return "bad_response", code == 500


def _failure_from_status(code: int, body: bytes) -> CloudFailure:
    reason, retry = _status_reason(code)
    msg = _status_detail(body)
    return CloudFailure(reason, f"HTTP {code}" + (f": {msg}" if msg else ""), retryable=retry)


def _failure_from_transport(httpx, e: Exception) -> CloudFailure:
    reason, retry = _transport_reason(httpx, e)
    return CloudFailure(reason, f"{type(e).__name__}: {str(e)[:120]}", retryable=retry)

