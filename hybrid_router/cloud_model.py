"""The cloud model as an ONNX Runtime session: for calibration on this machine and for ``edgekit cloud serve``.

The cloud side runs ONNX only. A ``.keras`` model is exported once with tf2onnx (dynamic batch
axis, input named ``input``) and cached by the file's sha256 under ``$EDGEKIT_CACHE_DIR``
(default ``~/.cache/edgekit``), so serving and calibration run the very same graph.

Execution providers: CUDA first when ONNX Runtime offers it, CPU otherwise; the providers the
session *actually* got are recorded, and asking for a provider that does not come up is an
error, never a silent fallback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.bundle import sha256_file
from edgekit.errors import InputError, ModelLoadError, RuntimeUnavailableError
from edgekit.nativelog import captured_output

__all__ = ["OnnxCloudModel", "cache_dir", "default_providers", "export_keras_onnx", "resolve_onnx"]

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(uint8)": "uint8",
              "tensor(int8)": "int8", "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool"}


def cache_dir() -> Path:
    """Where exported models are cached: ``$EDGEKIT_CACHE_DIR`` or ``~/.cache/edgekit``."""
    env = os.environ.get("EDGEKIT_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgekit"
    return base


def export_keras_onnx(model, path: Path, opset: int = 17) -> None:
    """Export a loaded Keras model to ONNX with a dynamic batch axis (input ``input``) via tf2onnx."""
    import tensorflow as tf
    import tf2onnx

    shape = (None, *model.inputs[0].shape[1:])
    fn = tf.function(lambda a: model(a, training=False))
    with captured_output():
        tf2onnx.convert.from_function(fn, input_signature=[tf.TensorSpec(shape, tf.float32, name="input")], opset=opset,
                                      output_path=str(path))


def resolve_onnx(model: str | os.PathLike[str]) -> Path:
    """An ONNX file for ``model``: the file itself, or the cached export of a ``.keras`` model."""
    p = Path(model)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such cloud model", "Pass an .onnx or .keras file.")
    if p.suffix == ".onnx":
        return p
    if p.suffix != ".keras":
        raise ModelLoadError(f"{p}: the cloud model must be .onnx or .keras", "Export it to ONNX, or save it as .keras.")
    target = cache_dir() / "cloud-onnx" / f"{sha256_file(p)[:24]}.onnx"
    if target.exists():
        return target
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        with captured_output():  # TensorFlow prints absl/oneDNN lines on import
            import keras
            import tensorflow  # noqa: F401 - imported here so its import-time output is captured too
    except ImportError:
        raise RuntimeUnavailableError("TensorFlow is not installed, so a .keras cloud model cannot be exported to ONNX",
                                      "Install it (pip install 'edgekit[convert]') or pass an .onnx file.") from None
    try:
        with captured_output():
            loaded = keras.saving.load_model(p, compile=False)
    except Exception as e:  # keras raises many types for a bad file
        raise ModelLoadError(f"{p}: Keras cannot load this model ({str(e)[:160]})") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        export_keras_onnx(loaded, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def default_providers() -> list[str]:
    """CUDA then CPU where ONNX Runtime has CUDA, else CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in have else ["CPUExecutionProvider"]


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output: name, dtype and shape (-1 for a free axis)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


class OnnxCloudModel:
    """An ONNX Runtime session over the cloud model; ``providers`` are the ones actually active."""

    def __init__(self, model: str | os.PathLike[str], *, providers: list[str] | None = None, require: bool = False,
                 intra_op_threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeUnavailableError("onnxruntime is not installed", "Install it with: pip install 'edgekit[router]'") from None
        self.path = resolve_onnx(model)
        self.source = Path(model)
        wanted = providers or default_providers()
        unknown = [p for p in wanted if p not in ort.get_available_providers()]
        if unknown and require:
            raise RuntimeUnavailableError(f"execution provider(s) {', '.join(unknown)} not available in this ONNX Runtime "
                                          f"(available: {', '.join(ort.get_available_providers())})",
                                          "Install onnxruntime-gpu with a matching CUDA, or drop --providers.")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        # ORT's intra-op threads spin between calls by default; in a server they would take the CPU the
        # HTTP event loop needs between batches (measured: batched throughput halved on 2 cores).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=[p for p in wanted if p not in unknown])
        except Exception as e:  # ORT raises its own types
            raise ModelLoadError(f"{self.path}: ONNX Runtime cannot load this model ({str(e)[:200]})", "Pass a valid .onnx file.") from None
        self.requested = list(wanted)
        self.providers = list(self.session.get_providers())
        if require and self.providers[0] != wanted[0]:
            raise RuntimeUnavailableError(f"asked for {wanted[0]} but ONNX Runtime came up with {self.providers[0]}",
                                          "Check the CUDA/cuDNN install (onnxruntime-gpu), or drop --providers.")

        def info(v) -> TensorInfo:
            return TensorInfo(v.name, _ORT_TYPES.get(v.type, v.type), tuple(d if isinstance(d, int) else -1 for d in v.shape))

        self.inputs = tuple(info(v) for v in self.session.get_inputs())
        self.outputs = tuple(info(v) for v in self.session.get_outputs())
        if len(self.inputs) != 1:
            raise InputError(f"{self.path}: the cloud model has {len(self.inputs)} inputs; edgekit serves single-input classifiers",
                             "Export a model with one input tensor.")

    @property
    def provider(self) -> str:
        """The execution provider that runs the graph (the first active one)."""
        return self.providers[0]

    @property
    def sha256(self) -> str:
        """sha256 of the file the user gave (``.onnx`` or ``.keras``)."""
        return sha256_file(self.source)

    def run(self, x: np.ndarray) -> np.ndarray:
        """The first output for a batch, as float32."""
        return self.session.run([self.outputs[0].name], {self.inputs[0].name: x})[0].astype(np.float32, copy=False)

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """The first output for any number of examples, in chunks."""
        x = np.asarray(x, dtype=self.inputs[0].dtype)
        if tuple(x.shape[1:]) != tuple(d for d in self.inputs[0].shape[1:]) and -1 not in self.inputs[0].shape[1:]:
            raise InputError(f"data shape {x.shape[1:]} does not fit the cloud model input {self.inputs[0].shape}",
                             "The cloud model must take the same input as the device model.")
        fixed = self.inputs[0].shape[0] if self.inputs[0].shape and self.inputs[0].shape[0] > 0 else None
        bs = fixed or batch_size
        return np.concatenate([self.run(x[i : i + bs]) for i in range(0, len(x), bs)])
