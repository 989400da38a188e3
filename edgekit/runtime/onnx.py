"""``ONNXModel``: an .onnx or .ort model run by ONNX Runtime on the CPU execution provider."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgekit.errors import BundleError, InputError, RuntimeUnavailableError
from edgekit.manifest import Preprocessing, TensorSpec
from edgekit.runtime.base import LocalModel, check_feeds

__all__ = ["ONNXModel", "ort_dtype"]

_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16", "tensor(uint8)": "uint8",
    "tensor(int8)": "int8", "tensor(uint16)": "uint16", "tensor(int16)": "int16", "tensor(int32)": "int32",
    "tensor(int64)": "int64", "tensor(uint32)": "uint32", "tensor(uint64)": "uint64", "tensor(bool)": "bool",
}


def ort_dtype(ort_type: str) -> str:
    """ONNX Runtime's ``tensor(float)`` spelling as a NumPy dtype name (unknown types pass through)."""
    return _ORT_DTYPES.get(ort_type, ort_type)


class ONNXModel(LocalModel):
    """An .onnx or .ort model run by ONNX Runtime on the CPU execution provider (or the ``providers`` given, in order)."""

    runtime = "onnxruntime"
    embedded: Preprocessing | None = None  # set when the graph takes raw input (--embed-preprocessing)

    def __init__(self, path: Path, *, num_threads: int | None = None, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeUnavailableError("onnxruntime is not installed, so ONNX models cannot run here",
                                          "Install it with: pip install 'edgekit[agent]'") from None

        def options(replay: bool):
            opts = ort.SessionOptions()
            if num_threads:
                opts.intra_op_num_threads = num_threads
            opts.log_severity_level = 3
            if replay:
                # ORT-format models built with the "Runtime" style carry their fused-kernel optimizations;
                # replaying them is safe here because load() checked the file's sha256 against the manifest.
                opts.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
            return opts

        self.runtime_optimizations_replayed = path.suffix == ".ort"
        try:
            try:
                self._session = ort.InferenceSession(str(path), sess_options=options(path.suffix == ".ort"), providers=list(providers))
            except Exception as e:
                if path.suffix != ".ort" or "runtime optimization" not in str(e):
                    raise
                # Seen on ORT 1.32: a record saved for NNAPI/XNNPACK partitioning that the CPU provider cannot replay
                # ("Not enough produced nodes in the runtime optimization record"). The record is optional: run the
                # model as stored.
                self._session = ort.InferenceSession(str(path), sess_options=options(False), providers=list(providers))
                self.runtime_optimizations_replayed = False
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise BundleError(f"{path}: ONNX Runtime cannot load this model ({str(e)[:200]})", "Rebuild it with 'edgekit convert'.") from None
        self.delegate = "cpu" if tuple(providers) == ("CPUExecutionProvider",) else self._session.get_providers()[0]
        ins, outs = self._session.get_inputs(), self._session.get_outputs()

        def spec(v) -> TensorSpec:
            return TensorSpec(name=v.name, shape=tuple(d if isinstance(d, int) else -1 for d in v.shape), dtype=ort_dtype(v.type))

        self.inputs = tuple(spec(v) for v in ins)
        self.outputs = tuple(spec(v) for v in outs)
        self._in_name, self._out_name = ins[0].name, outs[0].name
        self._out_names = [v.name for v in outs]
        self._in_shape = self.inputs[0].shape
        self._dtype = np.dtype(self.inputs[0].dtype)
        self._static_batch = self._in_shape[0] if self._in_shape and self._in_shape[0] > 0 else None

    def predict_raw(self, raw: np.ndarray) -> np.ndarray:
        if self._embedded() is not None:
            return self._run(np.asarray(raw))
        return super().predict_raw(raw)

    def _embedded(self) -> Preprocessing | None:
        pre = self.embedded or (self.manifest.preprocessing if self.manifest is not None else None)
        return pre if pre is not None and pre.embedded else None

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        pre = self._embedded()
        if pre is not None and len(self.inputs) == 1 and self._in_name in feeds:  # the graph takes raw data
            feeds = {self._in_name: pre.invert(feeds[self._in_name])}
        arrays = check_feeds(feeds, self.inputs)
        arrays = {s.name: arrays[s.name].astype(np.dtype(s.dtype), copy=False) if s.dtype in _ORT_DTYPES.values() else arrays[s.name]
                  for s in self.inputs}
        n = len(next(iter(arrays.values()))) if arrays else 1
        if self._static_batch == 1 and n != 1:
            parts = [self._session.run(self._out_names, {k: v[i : i + 1] for k, v in arrays.items()}) for i in range(n)]
            return {name: np.concatenate([p[j] for p in parts], axis=0) for j, name in enumerate(self._out_names)}
        return dict(zip(self._out_names, self._session.run(self._out_names, arrays)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        if len(self.inputs) != 1:
            return super().predict(x)
        pre = self._embedded()
        return self._run(pre.invert(x) if pre is not None else np.asarray(x))

    def _run(self, x: np.ndarray) -> np.ndarray:
        if tuple(x.shape[1:]) != tuple(self._in_shape[1:]):
            raise InputError(f"input shape {tuple(x.shape)} does not fit the model input {self._in_shape} (batch first)",
                             "Pass data in the model's layout.")
        x = x.astype(self._dtype, copy=False)
        run = self._session.run
        if self._static_batch == 1 and len(x) != 1:
            return np.concatenate([run([self._out_name], {self._in_name: x[i : i + 1]})[0] for i in range(len(x))]).astype(np.float32, copy=False)
        return run([self._out_name], {self._in_name: x})[0].astype(np.float32, copy=False)
