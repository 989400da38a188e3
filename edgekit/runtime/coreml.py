"""``CoreMLModel``: a Core ML package run by Core ML through coremltools (macOS only)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgekit.manifest import TensorSpec
from edgekit.runtime.base import LocalModel, check_feeds

__all__ = ["CoreMLModel"]


class CoreMLModel(LocalModel):
    """A Core ML package run by Core ML through coremltools (macOS only; not verified on this Linux host)."""

    runtime = "coreml"

    def __init__(self, path: Path) -> None:
        import coremltools as ct

        self._model = ct.models.MLModel(str(path))
        spec = self._model.get_spec()
        self._in_name = spec.description.input[0].name
        self._out_name = spec.description.output[0].name
        self.inputs = tuple(TensorSpec(name=d.name, shape=tuple(int(s) for s in d.type.multiArrayType.shape), dtype="float32")
                            for d in spec.description.input)
        self.outputs = tuple(TensorSpec(name=d.name, shape=tuple(int(s) for s in d.type.multiArrayType.shape), dtype="float32")
                             for d in spec.description.output)
        self.delegate = "ALL"

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = check_feeds(feeds, self.inputs)
        n = len(next(iter(arrays.values())))
        parts = [self._model.predict({k: v[i : i + 1] for k, v in arrays.items()}) for i in range(n)]
        return {s.name: np.concatenate([np.asarray(p[s.name]) for p in parts]) for s in self.outputs}

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return np.concatenate([np.asarray(self._model.predict({self._in_name: x[i : i + 1]})[self._out_name]) for i in range(len(x))]).astype(np.float32)
