"""Converters: one class per target format, found through one lazy registry."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from edgekit.errors import UsageError

if TYPE_CHECKING:
    from converters.base import Converter

__all__ = ["FORMATS", "get_converter"]

# format -> "module:Class"; modules are imported only when their format is used.
_REGISTRY: dict[str, str] = {
    "tflite": "converters.tflite:TFLiteConverter",
    "onnx": "converters.onnx:ONNXConverter",
    "coreml": "converters.coreml:CoreMLConverter",
}
FORMATS: tuple[str, ...] = tuple(_REGISTRY)


def get_converter(fmt: str) -> Converter:
    """The converter for a format name."""
    try:
        target = _REGISTRY[fmt]
    except KeyError:
        raise UsageError(f"unknown format '{fmt}'", f"Formats: {', '.join(FORMATS)}.") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()
