"""Run a bundle's model on this machine with float in, float out.

``load(bundle_path)`` picks the runtime from the manifest's format (LiteRT for ``.tflite``)
and does the int8/uint8/int16 quantize and dequantize from the manifest's scales, so callers
never see integer tensors.
"""

from __future__ import annotations

import json
import os
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.bundle import open_bundle, sha256_file
from edgekit.errors import BundleError, InputError, RuntimeUnavailableError
from edgekit.manifest import Manifest, Preprocessing, QuantParams, TensorSpec
from edgekit.nativelog import captured_output

__all__ = ["ACTIVE_POINTER", "ActiveModel", "ActivePointer", "CoreMLModel", "LocalModel", "ONNXModel", "TFLiteModel", "dequantize", "load",
           "load_active", "load_model_file", "quantize", "read_active_pointer", "timed_load"]


@dataclass(frozen=True)
class _Affine:
    """A tensor's quantization, precomputed once so the per-call path does no lookups."""

    dtype: np.dtype
    scale: float
    zero_point: int
    lo: int
    hi: int

    @classmethod
    def of(cls, spec: TensorSpec) -> _Affine | None:
        dtype = np.dtype(spec.dtype)
        if spec.quantization is None or dtype.kind == "f":
            return None
        info = np.iinfo(dtype)
        return cls(dtype, spec.quantization.scale, spec.quantization.zero_point, int(info.min), int(info.max))

    def quantize(self, x: np.ndarray) -> np.ndarray:
        # LiteRT rounds half away from zero (std::round). In float64 so that v + 0.5 cannot round up
        # (in float32, 0.49999997 + 0.5 == 1.0).
        v = np.asarray(x, dtype=np.float64) / self.scale
        return np.clip(np.trunc(v + np.copysign(0.5, v)) + self.zero_point, self.lo, self.hi).astype(self.dtype)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_zp32", np.float32(self.zero_point))
        object.__setattr__(self, "_scale32", np.float32(self.scale))

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return (q.astype(np.float32) - self._zp32) * self._scale32


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Float to the tensor's integer dtype with its scale/zero point (round half away from zero, saturate)."""
    a = _Affine.of(spec)
    return np.asarray(x, dtype=np.dtype(spec.dtype)) if a is None else a.quantize(x)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The tensor's integer values back to float32."""
    a = _Affine.of(spec)
    return q.astype(np.float32, copy=False) if a is None or q.dtype.kind == "f" else a.dequantize(q)


class LocalModel(ABC):
    """A model loaded on this machine; ``predict`` takes and returns float arrays."""

    runtime: str = ""
    delegate: str = "none"
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    manifest: Manifest | None = None

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Outputs of the first output for a batch ``x`` (float, the model's layout)."""

    @property
    def preprocessing(self) -> Preprocessing:
        """The manifest's preprocessing spec (identity for a bare model file)."""
        return self.manifest.preprocessing if self.manifest is not None else Preprocessing()

    def predict_raw(self, raw: np.ndarray) -> np.ndarray:
        """Outputs for raw data (e.g. uint8 pixels): the bundle's preprocessing is applied here or in the model."""
        return self.predict(self.preprocessing.apply(raw))

    def predict_one(self, x: np.ndarray) -> np.ndarray:
        """Outputs for one example without a batch axis."""
        return self.predict(x[None])[0]


def _litert():
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:
        raise RuntimeUnavailableError(
            "LiteRT (ai-edge-litert) is not installed, so .tflite models cannot run here",
            "Install it with: pip install 'edgekit[agent]'",
        ) from None
    return Interpreter, OpResolverType


def _spec_from_detail(d: dict) -> TensorSpec:
    scale, zp = d["quantization"]
    quant = QuantParams(scale=float(scale), zero_point=int(zp)) if scale else None
    return TensorSpec(name=d["name"], shape=tuple(int(s) for s in d["shape"]), dtype=np.dtype(d["dtype"]).name, quantization=quant)


class TFLiteModel(LocalModel):
    """A .tflite model run by LiteRT, batch 1 per invoke (edge models are static-shaped)."""

    runtime = "litert"

    def __init__(self, path: Path, *, num_threads: int | None = None, use_xnnpack: bool = True) -> None:
        Interpreter, OpResolverType = _litert()
        resolver = OpResolverType.AUTO if use_xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            with captured_output():  # LiteRT prints an INFO line per XNNPACK delegate
                self._interp = Interpreter(model_path=str(path), num_threads=num_threads, experimental_op_resolver_type=resolver)
                self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise BundleError(f"{path}: LiteRT cannot load this model ({e})", "Rebuild it with 'edgekit convert'.") from None
        self.delegate = "xnnpack" if use_xnnpack else "none"
        ins, outs = self._interp.get_input_details(), self._interp.get_output_details()
        self.inputs = tuple(_spec_from_detail(d) for d in ins)
        self.outputs = tuple(_spec_from_detail(d) for d in outs)
        self._in_index = ins[0]["index"]
        self._out_index = outs[0]["index"]
        self._in_shape = self.inputs[0].shape
        self._in_q, self._out_q = _Affine.of(self.inputs[0]), _Affine.of(self.outputs[0])
        self._in_dtype = np.dtype(self.inputs[0].dtype)
        self._set, self._invoke, self._get = self._interp.set_tensor, self._interp.invoke, self._interp.get_tensor

    def invoke_raw(self, q: np.ndarray) -> np.ndarray:
        """One invoke on an already-quantized batch-1 input; the raw integer output."""
        self._interp.set_tensor(self._in_index, q)
        self._interp.invoke()
        return self._interp.get_tensor(self._out_index)

    def predict(self, x: np.ndarray) -> np.ndarray:
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


class ONNXModel(LocalModel):
    """An .onnx or .ort model run by ONNX Runtime on the CPU execution provider."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, *, num_threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeUnavailableError("onnxruntime is not installed, so ONNX models cannot run here",
                                          "Install it with: pip install 'edgekit[agent]'") from None
        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = num_threads
        opts.log_severity_level = 3
        if path.suffix == ".ort":
            # ORT-format models built with the "Runtime" style carry their fused-kernel optimizations;
            # replaying them is safe here because load() checked the file's sha256 against the manifest.
            opts.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise BundleError(f"{path}: ONNX Runtime cannot load this model ({str(e)[:200]})", "Rebuild it with 'edgekit convert'.") from None
        self.delegate = "cpu"
        ins, outs = self._session.get_inputs(), self._session.get_outputs()

        def spec(v) -> TensorSpec:
            dtype = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(float16)": "float16"}.get(v.type, v.type)
            return TensorSpec(name=v.name, shape=tuple(d if isinstance(d, int) else -1 for d in v.shape), dtype=dtype)

        self.inputs = tuple(spec(v) for v in ins)
        self.outputs = tuple(spec(v) for v in outs)
        self._in_name, self._out_name = ins[0].name, outs[0].name
        self._in_shape = self.inputs[0].shape
        self._dtype = np.dtype(self.inputs[0].dtype)
        self._static_batch = self._in_shape[0] if self._in_shape and self._in_shape[0] > 0 else None

    embedded: Preprocessing | None = None  # set when the graph takes raw input (--embed-preprocessing)

    def predict_raw(self, raw: np.ndarray) -> np.ndarray:
        if self._embedded() is not None:
            return self._run(np.asarray(raw))
        return super().predict_raw(raw)

    def _embedded(self) -> Preprocessing | None:
        pre = self.embedded or (self.manifest.preprocessing if self.manifest is not None else None)
        return pre if pre is not None and pre.embedded else None

    def predict(self, x: np.ndarray) -> np.ndarray:
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


def load_model_file(path: Path, fmt: str, *, num_threads: int | None = None) -> LocalModel:
    """Load a bare model file of a format (used by converters before a bundle exists)."""
    if fmt == "tflite":
        return TFLiteModel(path, num_threads=num_threads)
    if fmt == "onnx":
        return ONNXModel(path, num_threads=num_threads)
    if fmt == "coreml":
        import sys

        if sys.platform != "darwin":
            raise RuntimeUnavailableError(
                f"{path.name}: Core ML models can only run on macOS (Core ML's runtime does not exist on {sys.platform})",
                "Run it on a Mac or iPhone; on Linux use the tflite or onnx bundle of the same model.",
            )
        return CoreMLModel(path)
    raise RuntimeUnavailableError(f"no runtime for format '{fmt}'", "Formats: tflite, onnx, coreml.")


class CoreMLModel(LocalModel):
    """A Core ML package run by Core ML through coremltools (macOS only)."""

    runtime = "coreml"

    def __init__(self, path: Path) -> None:
        import coremltools as ct

        self._model = ct.models.MLModel(str(path))
        spec = self._model.get_spec()
        self._in_name = spec.description.input[0].name
        self._out_name = spec.description.output[0].name
        self.delegate = "ALL"

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return np.concatenate([np.asarray(self._model.predict({self._in_name: x[i : i + 1]})[self._out_name]) for i in range(len(x))]).astype(np.float32)


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


# --- The device's active model (written by the agent, device_agents/slots.py; read here by apps) ---

ACTIVE_POINTER = "active.json"
"""Inside an agent data dir: ``{"sha256", "name", "version", "bundle": "models/<sha256>/bundle", "previous", ...}``,
replaced only by an atomic rename, so a reader sees the old or the new pointer, never a mix."""


@dataclass(frozen=True)
class ActivePointer:
    """Which bundle is active in an agent data dir."""

    sha256: str
    name: str
    version: str
    bundle: Path
    stamp: tuple[int, int]
    """(inode, mtime_ns) of the pointer file: changes with every switch."""


def read_active_pointer(data_dir: str | os.PathLike[str]) -> ActivePointer | None:
    """The active model of an agent data dir, or None when no model is active."""
    path = Path(data_dir) / ACTIVE_POINTER
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())  # the stamp of the very file read, even if a switch renames over it now
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError:
        raise BundleError(f"{path}: unreadable active-model pointer", "Run 'edgekit agent status'; the agent rewrites it.") from None
    if not data.get("sha256"):
        return None
    return ActivePointer(data["sha256"], data.get("name", ""), data.get("version", ""), Path(data_dir) / data["bundle"], (st.st_ino, st.st_mtime_ns))


def _pointer_stamp(data_dir: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(data_dir / ACTIVE_POINTER)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


class ActiveModel(LocalModel):
    """The model active in an agent data dir; follows the agent's switches without a restart.

    Every ``check_interval_s`` a ``predict`` stats the pointer file (a few microseconds); when the
    agent has switched models, the new one is loaded before that prediction. ``sha256`` and
    ``version`` name the model that answered the last call.
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, num_threads: int | None = None, check_interval_s: float = 1.0) -> None:
        self.data_dir = Path(data_dir)
        self.check_interval_s = check_interval_s
        self._threads = num_threads
        self._lock = threading.Lock()
        self._model: LocalModel | None = None
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self.sha256: str | None = None
        self.version: str | None = None
        self._reload()

    def _reload(self) -> None:
        ptr = read_active_pointer(self.data_dir)
        if ptr is None:
            self._model, self.sha256, self.version, self.manifest = None, None, None, None
            self._stamp = _pointer_stamp(self.data_dir)
            raise RuntimeUnavailableError(f"{self.data_dir}: no model is active on this device",
                                          "Install one with 'edgekit agent install' or wait for the fleet to assign one.")
        model = load(ptr.bundle, num_threads=self._threads)
        self._model, self._stamp = model, ptr.stamp
        self.sha256, self.version, self.manifest = ptr.sha256, ptr.version, model.manifest
        self.runtime, self.delegate, self.inputs, self.outputs = model.runtime, model.delegate, model.inputs, model.outputs

    def refresh(self) -> bool:
        """Load the newly active model if the agent switched; True when it did."""
        self._checked = time.monotonic()
        if _pointer_stamp(self.data_dir) == self._stamp and self._model is not None:
            return False
        with self._lock:
            if _pointer_stamp(self.data_dir) != self._stamp or self._model is None:
                self._reload()
                return True
        return False

    def predict(self, x: np.ndarray) -> np.ndarray:
        if time.monotonic() - self._checked >= self.check_interval_s:
            self.refresh()
        model = self._model
        if model is None:
            raise RuntimeUnavailableError(f"{self.data_dir}: no model is active on this device", "Wait for the agent to activate one.")
        return model.predict(x)

    def predict_raw(self, raw: np.ndarray) -> np.ndarray:
        if time.monotonic() - self._checked >= self.check_interval_s:
            self.refresh()
        if self._model is None:
            raise RuntimeUnavailableError(f"{self.data_dir}: no model is active on this device", "Wait for the agent to activate one.")
        return self._model.predict_raw(raw)


def load_active(data_dir: str | os.PathLike[str], *, num_threads: int | None = None, check_interval_s: float = 1.0) -> ActiveModel:
    """Load the model the device agent made active in ``data_dir``; it follows later switches by itself."""
    return ActiveModel(data_dir, num_threads=num_threads, check_interval_s=check_interval_s)
