"""``TFLiteModel``: a .tflite model run by LiteRT."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgekit.errors import BundleError, InputError, RuntimeUnavailableError
from edgekit.manifest import QuantParams, TensorSpec
from edgekit.nativelog import captured_output
from edgekit.runtime.base import LocalModel, check_feeds
from edgekit.runtime.quant import Affine

__all__ = ["TFLiteModel", "arena_span_bytes", "litert_interpreter", "signature_names"]


def litert_interpreter():
    """LiteRT's ``Interpreter`` and ``OpResolverType``, or a RuntimeUnavailableError naming the install."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:
        raise RuntimeUnavailableError(
            "LiteRT (ai-edge-litert) is not installed, so .tflite models cannot run here",
            "Install it with: pip install 'edgekit[agent]'",
        ) from None
    return Interpreter, OpResolverType


def signature_names(interp) -> dict[int, str]:
    """Tensor index -> the name the model's only signature gives it (the source model's input/output names).

    TFLite tensor names are the exporter's ('serving_default_a:0', 'StatefulPartitionedCall:1') and
    the output order need not follow the source's; the signature keeps the source's names.
    """
    try:
        sigs = interp._get_full_signature_list()  # the public get_signature_list() lacks the tensor indices
    except Exception:  # older runtimes
        return {}
    if len(sigs) != 1:
        return {}
    (sig,) = sigs.values()
    names = {int(i): str(n) for n, i in sig.get("inputs", {}).items()}
    names.update({int(i): str(n) for n, i in sig.get("outputs", {}).items()})
    return names


def arena_span_bytes(interp, indices: set[int] | None = None) -> int:
    """Bytes covered by the buffers of ``indices`` (all tensors when None) after ``allocate_tensors``.

    Buffers the arena reuses for several tensors overlap and are counted once.
    """
    spans: list[tuple[int, int]] = []
    for d in interp.get_tensor_details():
        if indices is not None and d["index"] not in indices:
            continue
        try:
            t = interp.tensor(d["index"])()
        except (ValueError, RuntimeError):  # tensors without data (optional or delegated intermediates)
            continue
        ptr = t.__array_interface__["data"][0]
        if ptr and t.nbytes:
            spans.append((ptr, ptr + t.nbytes))
    total, end = 0, 0
    for lo, hi in sorted(spans):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def constant_bytes(interp) -> dict[str, int]:
    """Bytes of the model's constant tensors (weights, biases, shapes) by dtype name.

    A constant is an operand of some op that no op produces and that is not a graph input.
    """
    ops = interp._get_ops_details()  # the only API that lists the graph's ops
    produced = {int(i) for op in ops for i in op["outputs"] if i >= 0} | {d["index"] for d in interp.get_input_details()}
    used = {int(i) for op in ops for i in op["inputs"] if i >= 0}
    details = {d["index"]: d for d in interp.get_tensor_details()}
    out: dict[str, int] = {}
    for i in sorted(used - produced):
        d = details.get(i)
        if d is None:
            continue
        dtype = np.dtype(d["dtype"])
        out[dtype.name] = out.get(dtype.name, 0) + int(np.prod(d["shape"], dtype=np.int64)) * dtype.itemsize
    return out


def _spec_from_detail(d: dict, names: dict[int, str]) -> TensorSpec:
    scale, zp = d["quantization"]
    quant = QuantParams(scale=float(scale), zero_point=int(zp)) if scale else None
    return TensorSpec(name=names.get(d["index"], d["name"]), shape=tuple(int(s) for s in d["shape"]), dtype=np.dtype(d["dtype"]).name,
                      quantization=quant)


class TFLiteModel(LocalModel):
    """A .tflite model run by LiteRT, batch 1 per invoke (edge models are static-shaped)."""

    runtime = "litert"

    def __init__(self, path: Path, *, num_threads: int | None = None, use_xnnpack: bool = True) -> None:
        Interpreter, OpResolverType = litert_interpreter()
        resolver = OpResolverType.AUTO if use_xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            with captured_output():  # LiteRT prints an INFO line per XNNPACK delegate
                self._interp = Interpreter(model_path=str(path), num_threads=num_threads, experimental_op_resolver_type=resolver)
                self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise BundleError(f"{path}: LiteRT cannot load this model ({e})", "Rebuild it with 'edgekit convert'.") from None
        self.delegate = "xnnpack" if use_xnnpack else "none"
        ins, outs = self._interp.get_input_details(), self._interp.get_output_details()
        names = signature_names(self._interp)
        self.inputs = tuple(_spec_from_detail(d, names) for d in ins)
        self.outputs = tuple(_spec_from_detail(d, names) for d in outs)
        self._in_indices = tuple(d["index"] for d in ins)
        self._out_indices = tuple(d["index"] for d in outs)
        self._in_affine = tuple(Affine.of(s) for s in self.inputs)
        self._out_affine = tuple(Affine.of(s) for s in self.outputs)
        self._in_index, self._out_index = self._in_indices[0], self._out_indices[0]
        self._in_shape = self.inputs[0].shape
        self._in_q, self._out_q = self._in_affine[0], self._out_affine[0]
        self._in_dtype = np.dtype(self.inputs[0].dtype)
        self._set, self._invoke, self._get = self._interp.set_tensor, self._interp.invoke, self._interp.get_tensor

    def invoke_raw(self, q: np.ndarray) -> np.ndarray:
        """One invoke on an already-quantized batch-1 input; the raw integer output."""
        self._interp.set_tensor(self._in_index, q)
        self._interp.invoke()
        return self._interp.get_tensor(self._out_index)

    def arena_bytes(self) -> int:
        """Bytes LiteRT holds for this model's tensors after ``allocate_tensors`` (weights included; shared buffers once)."""
        return arena_span_bytes(self._interp)

    def activation_arena_bytes(self) -> int:
        """Bytes of the activation buffers (op outputs and inputs) in LiteRT's arena, shared buffers once."""
        ids = {int(i) for op in self._interp._get_ops_details() for i in op["outputs"] if i >= 0}
        ids |= set(self._in_indices)
        return arena_span_bytes(self._interp, ids)

    def _feed_one(self, i: int, a: np.ndarray) -> np.ndarray:
        aff = self._in_affine[i]
        return aff.quantize(a) if aff is not None else a.astype(np.dtype(self.inputs[i].dtype), copy=False)

    def _fetch_one(self, j: int, keep_dtype: bool) -> np.ndarray:
        out = self._get(self._out_indices[j])
        aff = self._out_affine[j]
        if aff is not None:
            return aff.dequantize(out)
        return out if keep_dtype and out.dtype.kind != "f" else out.astype(np.float32, copy=False)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = check_feeds(feeds, self.inputs)
        prepared = [self._feed_one(i, arrays[s.name]) for i, s in enumerate(self.inputs)]
        n = len(prepared[0]) if prepared else 1
        per_output: list[list[np.ndarray]] = [[] for _ in self.outputs]
        for k in range(n):
            for i, q in enumerate(prepared):
                self._set(self._in_indices[i], q[k : k + 1])
            self._invoke()
            for j in range(len(self.outputs)):
                per_output[j].append(self._fetch_one(j, keep_dtype=True).copy())
        return {s.name: (parts[0] if n == 1 else np.concatenate(parts, axis=0)) for s, parts in zip(self.outputs, per_output)}

    def predict(self, x: np.ndarray) -> np.ndarray:
        if len(self.inputs) != 1:
            return super().predict(x)
        x = np.asarray(x, dtype=np.float32)
        if x.shape[1:] != self._in_shape[1:]:
            raise InputError(
                f"input shape {tuple(x.shape)} does not fit the model input {self._in_shape} (batch first)",
                "Pass float32 data in the model's layout.",
            )
        q = self._in_q.quantize(x) if self._in_q is not None else x.astype(self._in_dtype, copy=False)
        if len(q) == 1:  # the common edge call: no slicing or concatenation
            self._set(self._in_index, q)
            self._invoke()
            out = self._get(self._out_index)
        else:
            outs = []
            for i in range(len(q)):
                self._set(self._in_index, q[i : i + 1])
                self._invoke()
                outs.append(self._get(self._out_index))
            out = np.concatenate(outs, axis=0)
        return self._out_q.dequantize(out) if self._out_q is not None else out.astype(np.float32, copy=False)
