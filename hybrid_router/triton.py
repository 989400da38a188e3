"""``edgekit cloud export-triton``: a Triton model repository for the same ONNX model.

::

    OUT/NAME/config.pbtxt      platform onnxruntime_onnx, max_batch_size, dynamic_batching
    OUT/NAME/1/model.onnx

Triton (and KServe with the Triton runtime) then serves the model over the same KServe v2
REST protocol as ``edgekit cloud serve``; names and shapes come from the ONNX graph, so
the router's client works against either unchanged.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import IncompatibleError, OutputError

__all__ = ["TritonExport", "export_triton", "render_config"]

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8",
                 "int32": "TYPE_INT32", "int64": "TYPE_INT64", "bool": "TYPE_BOOL"}


@dataclass(frozen=True)
class TritonExport:
    """What was written."""

    repository: Path
    model_dir: Path
    config: Path
    model_file: Path


def _tensor(t) -> str:
    dtype = TRITON_TYPES.get(t.dtype)
    if dtype is None:
        raise IncompatibleError(f"tensor '{t.name}' has dtype {t.dtype}, which Triton's config cannot express here")
    dims = ", ".join(str(d) for d in t.shape[1:])
    return f'  {{\n    name: "{t.name}"\n    data_type: {dtype}\n    dims: [ {dims} ]\n  }}'


def render_config(name: str, inputs, outputs, *, max_batch: int, max_delay_us: int, max_queue: int) -> str:
    """config.pbtxt text (protobuf text format) for an ONNX model with a free batch axis."""
    preferred = sorted({b for b in (max_batch // 4, max_batch // 2, max_batch) if b >= 1})
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch}\n"
        "input [\n" + ",\n".join(_tensor(t) for t in inputs) + "\n]\n"
        "output [\n" + ",\n".join(_tensor(t) for t in outputs) + "\n]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]\n"
        f"  max_queue_delay_microseconds: {max_delay_us}\n"
        "  default_queue_policy {\n"
        f"    max_queue_size: {max_queue}\n"
        "  }\n"
        "}\n"
        "instance_group [\n  {\n    count: 1\n    kind: KIND_AUTO\n  }\n]\n"
    )


def export_triton(model: str | os.PathLike[str], name: str, out: Path, *, max_batch: int = 32, max_delay_us: int = 2000,
                  max_queue: int = 1024) -> TritonExport:
    """Write the repository; the model must have a free batch axis (Triton batches along it)."""
    from hybrid_router.cloud_model import OnnxCloudModel

    m = OnnxCloudModel(model, providers=["CPUExecutionProvider"])
    for t in (*m.inputs, *m.outputs):
        if not t.shape or t.shape[0] != -1:
            raise IncompatibleError(f"tensor '{t.name}' has shape {list(t.shape)}: no free batch axis, so Triton cannot batch it",
                                    "Export the model with a dynamic first dimension (tf2onnx: input_signature with None).")
        if any(d < 0 for d in t.shape[1:]):
            raise IncompatibleError(f"tensor '{t.name}' has free axes beyond the batch: {list(t.shape)}",
                                    "Export the model with fixed shapes apart from the batch axis.")
    model_dir = out / name
    try:
        (model_dir / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(m.path, model_dir / "1" / "model.onnx")
        config = model_dir / "config.pbtxt"
        config.write_text(render_config(name, m.inputs, m.outputs, max_batch=max_batch, max_delay_us=max_delay_us, max_queue=max_queue))
    except OSError as e:
        raise OutputError(f"{out}: cannot write the model repository ({e.strerror})") from None
    return TritonExport(out, model_dir, config, model_dir / "1" / "model.onnx")
