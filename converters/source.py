"""The float source model: loaded once, normalized to a static batch-1 SavedModel.

Edge runtimes want static shapes (a dynamic batch adds SHAPE/STRIDED_SLICE/PACK ops the
Edge TPU and NNAPI do not take), so every source is re-exported with batch 1 before any
converter sees it. TensorFlow is imported here and only here on the conversion path.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.bundle import sha256_file
from edgekit.errors import IncompatibleError, ModelLoadError
from edgekit.nativelog import captured_output

__all__ = ["SourceModel", "load_source", "import_tensorflow"]


def import_tensorflow() -> Any:
    """Import TensorFlow quietly, or explain which extra provides it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        import tensorflow as tf
    except ImportError:
        raise ModelLoadError(
            "TensorFlow is not installed, so Keras/SavedModel models cannot be converted",
            "Install the conversion tools with: pip install 'edgekit[convert]'",
        ) from None
    tf.get_logger().setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    return tf


@dataclass
class SourceModel:
    """A float model ready for every converter."""

    path: Path
    kind: str  # "keras" or "saved_model"
    sha256: str
    input_shape: tuple[int, ...]  # static, batch 1
    output_shape: tuple[int, ...]
    param_count: int
    workdir: Path = Path(".")  # scratch space converters may share (e.g. the float ONNX export)
    onnx_path: Path | None = None  # ONNX sources
    cache: dict[str, Any] = field(default_factory=dict)  # per-run results converters reuse across profiles
    keras_model: Any = field(repr=False, default=None)  # Keras sources
    _predict: Any = field(repr=False, default=None)
    _export: Any = field(repr=False, default=None)  # writes the static batch-1 SavedModel, on first use

    @property
    def saved_model_dir(self) -> Path | None:
        """A static batch-1 SavedModel of the source (exported once, when a converter first asks); None for ONNX."""
        if self._export is None:
            return None
        if "saved_model_dir" not in self.cache:
            self.cache["saved_model_dir"] = self._export()
        return self.cache["saved_model_dir"]

    @property
    def num_classes(self) -> int:
        """Size of the last output axis."""
        return int(self.output_shape[-1])

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Float outputs of the source model for a batch."""
        outs = [np.asarray(self._predict(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
        return np.concatenate(outs, axis=0).astype(np.float32)


def _static_shape(shape: Any, where: str) -> tuple[int, ...]:
    dims = list(shape)
    if not dims:
        raise IncompatibleError(f"{where}: the model input is a scalar", "edgekit converts models with a batched tensor input.")
    rest = dims[1:]
    if any(d is None for d in rest):
        raise IncompatibleError(
            f"{where}: the input shape {tuple(dims)} has unknown dimensions besides the batch",
            "Export the model with a fixed input size (e.g. keras.Input((28, 28, 1))).",
        )
    return (1, *(int(d) for d in rest))


def _load_keras(path: Path, workdir: Path, tf: Any) -> SourceModel:
    import keras

    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path}: not a Keras model archive (the .keras zip is damaged or truncated)", "Save the model again with model.save('model.keras').")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:  # Keras raises many types for a damaged file
        raise ModelLoadError(f"{path}: Keras cannot load this model ({type(e).__name__}: {str(e)[:200]})", "Check the file is a complete .keras/.h5 model saved by Keras.") from None
    if len(model.inputs) != 1:
        raise IncompatibleError(f"{path}: the model has {len(model.inputs)} inputs", "edgekit converts single-input models.")
    input_shape = _static_shape(model.inputs[0].shape, str(path))
    out_shape = tuple(model.outputs[0].shape)

    def export() -> Path:
        export_dir = workdir / "source_saved_model"
        with captured_output():
            model.export(str(export_dir), format="tf_saved_model", input_signature=[tf.TensorSpec(input_shape, tf.float32, name="input")],
                         verbose=False)
        return export_dir

    def predict(x: np.ndarray) -> np.ndarray:
        out = model(x, training=False)
        return out[0] if isinstance(out, (list, tuple)) else out

    return SourceModel(
        workdir=workdir,
        path=path,
        kind="keras",
        sha256=sha256_file(path),
        input_shape=input_shape,
        output_shape=(1, *(int(d) for d in out_shape[1:])),
        param_count=int(model.count_params()),
        keras_model=model,
        _export=export,
        _predict=predict,
    )


def _load_saved_model(path: Path, workdir: Path, tf: Any) -> SourceModel:
    if not (path / "saved_model.pb").is_file():
        raise ModelLoadError(f"{path}: a directory without saved_model.pb is not a SavedModel", "Pass a SavedModel directory or a .keras file.")
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path}: TensorFlow cannot load this SavedModel ({type(e).__name__}: {str(e)[:200]})", "Check the SavedModel is complete.") from None
    sigs = dict(loaded.signatures)
    key = "serving_default" if "serving_default" in sigs else next(iter(sigs), None)
    if key is None:
        raise ModelLoadError(f"{path}: the SavedModel has no serving signature", "Export it with model.export(path) or a 'serving_default' signature.")
    sig = sigs[key]
    _, kwargs = sig.structured_input_signature
    if len(kwargs) != 1:
        raise IncompatibleError(f"{path}: signature '{key}' has {len(kwargs)} inputs", "edgekit converts single-input models.")
    (in_name, spec), = kwargs.items()
    input_shape = _static_shape(spec.shape.as_list(), str(path))
    out_key = sorted(sig.structured_outputs)[0]
    out_shape = sig.structured_outputs[out_key].shape.as_list()

    module = tf.Module()
    module.inner = loaded
    module.serve = tf.function(lambda a: sig(**{in_name: a})[out_key], input_signature=[tf.TensorSpec(input_shape, tf.float32, name="input")])

    def export() -> Path:
        export_dir = workdir / "source_saved_model"
        tf.saved_model.save(module, str(export_dir), signatures={"serving_default": module.serve})
        return export_dir
    params = int(sum(np.prod(v.shape) for v in getattr(loaded, "variables", [])))
    dynamic_batch = spec.shape.as_list()[0] is None

    def predict(x: np.ndarray) -> np.ndarray:
        if dynamic_batch:
            return sig(**{in_name: tf.constant(x, tf.float32)})[out_key]
        return np.concatenate([sig(**{in_name: tf.constant(x[i : i + 1], tf.float32)})[out_key] for i in range(len(x))])

    return SourceModel(
        workdir=workdir,
        path=path,
        kind="saved_model",
        sha256=sha256_file(path),
        input_shape=input_shape,
        output_shape=(1, *(int(d) for d in out_shape[1:])),
        param_count=params,
        _export=export,
        _predict=predict,
    )


def _load_onnx(path: Path, workdir: Path, input_shape: tuple[int, ...] | None) -> SourceModel:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise ModelLoadError("onnx/onnxruntime are not installed, so .onnx models cannot be converted",
                             "Install the conversion tools with: pip install 'edgekit[convert]'") from None
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # DecodeError, ValidationError, ...
        raise ModelLoadError(f"{path}: not a valid ONNX model (onnx.checker: {str(e).strip().splitlines()[0][:200]})",
                             "Export the model again, or check it with onnx.checker.check_model.") from None
    inits = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    if len(inputs) != 1:
        raise IncompatibleError(f"{path}: the model has {len(inputs)} inputs", "edgekit converts single-input models.")
    v = inputs[0]
    if v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise IncompatibleError(f"{path}: input '{v.name}' is not float32", "Export the model with a float32 input.")
    dims = [d.dim_value if d.dim_value > 0 else None for d in v.type.tensor_type.shape.dim]
    if input_shape is not None:
        if len(input_shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims[1:], input_shape[1:])):
            raise IncompatibleError(f"{path}: --input-shape {input_shape} does not fit the model input {tuple(dims)}",
                                    "Give one size per dimension, batch first.")
        static = (1, *input_shape[1:])
    elif any(d is None for d in dims[1:]):
        raise IncompatibleError(f"{path}: input '{v.name}' has dynamic dimensions {tuple(d if d else '?' for d in dims)}",
                                "Fix them with --input-shape, e.g. --input-shape 1,3,224,224.")
    else:
        static = (1, *(int(d) for d in dims[1:]))
    # Pin the batch (and any dynamic dims) so the exported and quantized graphs are static.
    for d, size in zip(v.type.tensor_type.shape.dim, static):
        d.ClearField("dim_param")
        d.dim_value = size
    fixed = workdir / "source.onnx"
    onnx.save(model, str(fixed))
    with captured_output():
        session = ort.InferenceSession(str(fixed), providers=["CPUExecutionProvider"])
    out_shape = session.get_outputs()[0].shape
    name = session.get_inputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        return np.concatenate([session.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])

    from onnx import numpy_helper

    params = int(sum(numpy_helper.to_array(i).size for i in model.graph.initializer))
    return SourceModel(path=path, kind="onnx", sha256=sha256_file(path), input_shape=static,
                       output_shape=(1, *(int(d) if isinstance(d, int) else 1 for d in out_shape[1:])), param_count=params,
                       workdir=workdir, onnx_path=fixed, _predict=predict)


def load_source(path: str | os.PathLike[str], workdir: Path, input_shape: tuple[int, ...] | None = None) -> SourceModel:
    """Load a .keras/.h5/.onnx file or a SavedModel directory and export it for the converters."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file or directory", "Check the model path.")
    if p.is_file() and p.suffix not in (".keras", ".h5", ".hdf5", ".onnx"):
        raise ModelLoadError(
            f"{p}: '{p.suffix or p.name}' is not a model format edgekit converts",
            "Pass a .keras/.h5/.onnx file or a SavedModel directory.",
        )
    if p.suffix == ".onnx":
        return _load_onnx(p, workdir, input_shape)
    tf = import_tensorflow()
    return _load_keras(p, workdir, tf) if p.is_file() else _load_saved_model(p, workdir, tf)
