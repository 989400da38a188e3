"""Run a bundle's model on this machine with float in, float out.

``load(bundle_path)`` picks the runtime from the manifest's format (LiteRT for ``.tflite``,
ONNX Runtime for ``.onnx``/``.ort``, Core ML on macOS) and does the int8/uint8/int16 quantize
and dequantize from the model's scales, so callers never see quantized tensors.
``model.run({name: array, ...})`` returns every output by name; ``model.predict(x)`` is the
single-input, first-output shorthand. One module per runtime, mirroring ``converters/``.
"""

from __future__ import annotations

from edgekit.runtime.active import ACTIVE_POINTER, ActiveModel, ActivePointer, load_active, read_active_pointer
from edgekit.runtime.base import LocalModel, check_feeds
from edgekit.runtime.loader import load, load_model_file, timed_load
from edgekit.runtime.quant import dequantize, quantize

__all__ = ["ACTIVE_POINTER", "ActiveModel", "ActivePointer", "CoreMLModel", "LocalModel", "ONNXModel", "TFLiteModel", "check_feeds",
           "dequantize", "load", "load_active", "load_model_file", "quantize", "read_active_pointer", "timed_load"]


def __getattr__(name: str):
    # The runtime classes import their runtime's module only when asked for (an agent may have only one).
    if name == "TFLiteModel":
        from edgekit.runtime.tflite import TFLiteModel

        return TFLiteModel
    if name == "ONNXModel":
        from edgekit.runtime.onnx import ONNXModel

        return ONNXModel
    if name == "CoreMLModel":
        from edgekit.runtime.coreml import CoreMLModel

        return CoreMLModel
    raise AttributeError(f"module 'edgekit.runtime' has no attribute {name!r}")
