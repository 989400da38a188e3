"""Per-node attribute and dtype rules for placements that are estimated (the runtime does not run here).

Each rule cites the vendor's text it comes from. A rule sees one node as LiteRT/onnx read it
(op, input dtype, first input's shape, reduction axes) and returns why the accelerator refuses it,
or "" when it may take it.
"""

from __future__ import annotations

import math

from converters.coverage_runtime import NodePlacement
from edgekit.profiles import Accelerator

__all__ = ["EDGETPU_TABLE", "refusal"]

EDGETPU_TABLE = "https://coral.ai/docs/edgetpu/models-intro/#supported-operations"
_REDUCTIONS = {"MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_PROD"}


def _dtype_ok(acc: Accelerator, dtype: str) -> bool:
    if dtype in ("", "int32", "int64", "bool"):
        return True
    if dtype == "int16x8":
        return acc.int16x8_kernels
    return dtype in acc.dtypes


def _edgetpu(node: NodePlacement) -> str:
    if node.op == "SOFTMAX" and node.shape:
        inner = node.shape[1:] if len(node.shape) > 1 else node.shape
        if len([d for d in inner if d != 1]) > 1 or math.prod(inner) > 16000:
            return f"the Edge TPU's SOFTMAX takes only a 1-D input of at most 16,000 elements, not {list(node.shape)} ({EDGETPU_TABLE})"
    if node.op in _REDUCTIONS and node.axes is not None and node.shape:
        if any(a % len(node.shape) == 0 for a in node.axes):
            return f"the Edge TPU's {node.op} cannot reduce over the batch dimension (axes {list(node.axes)}; {EDGETPU_TABLE})"
    return ""


def refusal(acc: Accelerator, node: NodePlacement) -> str:
    """Why ``acc`` does not take ``node`` by its dtype or attributes; "" when nothing refuses it."""
    # QUANTIZE/DEQUANTIZE convert between dtypes by definition: the op list alone decides them.
    if node.op not in ("QUANTIZE", "DEQUANTIZE", "QuantizeLinear", "DequantizeLinear") and not _dtype_ok(acc, node.dtype):
        src = acc.int16x8_source if node.dtype == "int16x8" and acc.int16x8_source else acc.source
        return f"{acc.name} has no {node.dtype} kernels for {node.op} (profile dtypes: {', '.join(acc.dtypes)}; {src})"
    if acc.id == "edgetpu":
        return _edgetpu(node)
    return ""
