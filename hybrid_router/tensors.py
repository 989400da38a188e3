"""KServe v2 tensors on the server side: one checked decoder for REST (JSON or binary) and gRPC inputs.

Both transports hand the served model the same thing: a NumPy array of the model input's dtype
whose shape fits the model's (``-1``: any size), with finite values. Anything else is
:class:`BadInput` with a message that says what to send instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from hybrid_router.client import DATATYPES

__all__ = ["BadInput", "InferInput", "InferRequest", "RequestedOutput", "V2_OF", "check_input", "decode_rest", "parse_shape"]

V2_OF = {v: k for k, v in DATATYPES.items()}
"""NumPy dtype name -> KServe v2 datatype."""


class BadInput(Exception):
    """A request the model cannot take (HTTP 400, gRPC INVALID_ARGUMENT)."""


class InferInput(BaseModel):
    """One input tensor of a KServe v2 inference request."""

    model_config = ConfigDict(extra="ignore")
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    """An output the client asks for; ``parameters.binary_data`` asks for raw bytes."""

    model_config = ConfigDict(extra="ignore")
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    """A KServe v2 inference request body."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


def parse_shape(text: str) -> tuple[int, ...]:
    """``1x3x224x224`` (or ``1,3,224,224``) as a shape; ValueError when it is not one."""
    parts = [p for p in text.replace(",", "x").split("x") if p.strip()]
    dims = tuple(int(p) for p in parts)
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"{text!r} is not a shape of positive sizes such as 1x3x224x224")
    return dims


def check_input(spec, name: str, datatype: str, shape: list[int] | tuple[int, ...]) -> np.dtype:
    """Check one input's header against the model's input ``spec`` (a TensorInfo); its NumPy dtype."""
    want_type = V2_OF.get(spec.dtype, spec.dtype)
    if name != spec.name:
        raise BadInput(f"unknown input '{name}'; the model's input is '{spec.name}'")
    if datatype != want_type:
        raise BadInput(f"input '{name}' has datatype {datatype}; the model takes {want_type}")
    want = spec.shape
    if len(shape) != len(want) or any(s < 0 for s in shape) or any(w >= 0 and s != w for s, w in zip(shape[1:], want[1:])) \
            or (want and want[0] >= 0 and shape[0] != want[0]):
        raise BadInput(f"input shape {list(shape)} does not fit the model's {list(want)} (-1: any size)")
    if shape and shape[0] < 1:
        raise BadInput("the batch is empty")
    return np.dtype(spec.dtype)


def finish_input(x: np.ndarray, shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """The decoded values in ``shape``, refusing a wrong count and non-finite floats."""
    n = int(np.prod(shape))
    if x.size != n:
        raise BadInput(f"input has {x.size} values, shape {list(shape)} needs {n}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise BadInput("input holds NaN or infinity")
    return x.reshape(shape)


def from_bytes(raw: bytes, dtype: np.dtype, shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """Raw little-endian tensor bytes (the binary extension, gRPC raw contents) as an array."""
    need = int(np.prod(shape)) * dtype.itemsize
    if len(raw) != need:
        raise BadInput(f"input has {len(raw)} bytes, shape {list(shape)} of {V2_OF.get(dtype.name, dtype.name)} needs {need}")
    return finish_input(np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False), shape)


def decode_rest(body: bytes, header_length: str | None, spec) -> tuple[np.ndarray, InferRequest]:
    """The input array and the parsed request of a REST inference body (JSON, or JSON + binary tensor data)."""
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
    dtype = check_input(spec, tin.name, tin.datatype, tin.shape)
    size = (tin.parameters or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != len(binary):
            raise BadInput(f"binary_data_size {size} does not match the {len(binary)} bytes after the JSON header")
        return from_bytes(binary, dtype, tin.shape), req
    if binary:
        raise BadInput(f"{len(binary)} bytes after the JSON header but no input has binary_data_size")
    if tin.data is None:
        raise BadInput(f"input '{tin.name}' has neither 'data' nor binary_data_size")
    try:
        x = np.asarray(tin.data, dtype=dtype)
    except (ValueError, TypeError, OverflowError):
        raise BadInput(f"input data is not {V2_OF.get(dtype.name, dtype.name)} numbers") from None
    return finish_input(x, tin.shape), req
