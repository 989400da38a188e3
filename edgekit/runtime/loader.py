"""Load a model file or a bundle with the runtime of its format."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from edgekit.bundle import open_bundle, sha256_file
from edgekit.errors import BundleError, RuntimeUnavailableError
from edgekit.runtime.base import LocalModel

__all__ = ["load", "load_model_file", "timed_load"]


def load_model_file(path: Path, fmt: str, *, num_threads: int | None = None) -> LocalModel:
    """Load a bare model file of a format (used by converters before a bundle exists)."""
    if fmt == "tflite":
        from edgekit.runtime.tflite import TFLiteModel

        return TFLiteModel(path, num_threads=num_threads)
    if fmt == "onnx":
        from edgekit.runtime.onnx import ONNXModel

        return ONNXModel(path, num_threads=num_threads)
    if fmt == "coreml":
        if sys.platform != "darwin":
            raise RuntimeUnavailableError(
                f"{path.name}: Core ML models can only run on macOS (Core ML's runtime does not exist on {sys.platform})",
                "Run it on a Mac or iPhone; on Linux use the tflite or onnx bundle of the same model.",
            )
        from edgekit.runtime.coreml import CoreMLModel

        return CoreMLModel(path)
    raise RuntimeUnavailableError(f"no runtime for format '{fmt}'", "Formats: tflite, onnx, coreml.")


def load(bundle_path: str | os.PathLike[str], *, num_threads: int | None = None) -> LocalModel:
    """Load a bundle's model with its runtime; checks the file hash first."""
    bundle = open_bundle(bundle_path)
    if sha256_file(bundle.model_path) != bundle.manifest.sha256:
        raise BundleError(
            f"{bundle.model_path}: sha256 does not match the manifest; the model file was changed",
            "Run 'edgekit bundle verify' and rebuild or re-fetch the bundle.",
        )
    model = load_model_file(bundle.model_path, bundle.manifest.format, num_threads=num_threads)
    model.manifest = bundle.manifest
    return model


def timed_load(bundle_path: str | os.PathLike[str], *, num_threads: int | None = None) -> tuple[LocalModel, float]:
    """``load`` plus the seconds it took."""
    t0 = time.perf_counter()
    model = load(bundle_path, num_threads=num_threads)
    return model, time.perf_counter() - t0
