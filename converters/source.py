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
from edgekit.errors import IncompatibleError, ModelLoadError, UsageError
from edgekit.manifest import TensorSpec
from edgekit.nativelog import captured_output

__all__ = ["Feeds", "SourceModel", "import_tensorflow", "keras_source", "load_source"]


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


Feeds = dict[str, np.ndarray]


@dataclass
class SourceModel:
    """A float model ready for every converter: every input and output by name, static batch 1."""

    path: Path
    kind: str  # "keras", "saved_model", "onnx" or "torch"
    sha256: str
    inputs: tuple[TensorSpec, ...]  # static, batch 1; names are the keys of calibration/eval .npz files
    outputs: tuple[TensorSpec, ...]
    param_count: int
    workdir: Path = Path(".")  # scratch space converters may share (e.g. the float ONNX export)
    onnx_path: Path | None = None  # ONNX sources (normalised: static, IR >= 4)
    cache: dict[str, Any] = field(default_factory=dict)  # per-run results converters reuse across profiles
    keras_model: Any = field(repr=False, default=None)  # Keras sources
    torch_program: Any = field(repr=False, default=None)  # PyTorch sources: the torch.export ExportedProgram
    _run: Any = field(repr=False, default=None)  # (feeds of one batch) -> list of outputs in ``outputs`` order
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
    def input_shape(self) -> tuple[int, ...]:
        """Shape of the first input (batch 1)."""
        return self.inputs[0].shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of the first output (batch 1)."""
        return self.outputs[0].shape

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    @property
    def num_classes(self) -> int:
        """Size of the first output's class axis (the one non-unit axis), else of its last axis."""
        dims = [d for d in self.outputs[0].shape[1:] if d != 1]
        return int(dims[0]) if len(dims) == 1 else int(self.outputs[0].shape[-1])

    def run(self, feeds: Feeds, batch_size: int = 64) -> Feeds:
        """Float outputs of the source model by output name, in batches of ``batch_size``."""
        n = len(next(iter(feeds.values())))
        parts: list[list[np.ndarray]] = [[] for _ in self.outputs]
        for i in range(0, n, batch_size):
            outs = self._run({k: v[i : i + batch_size] for k, v in feeds.items()})
            for j, o in enumerate(outs):
                parts[j].append(np.asarray(o))
        return {s.name: np.concatenate(p, axis=0) for s, p in zip(self.outputs, parts)}

    def predict(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """The first output for a batch of the first input (single-input models)."""
        return self.run({self.inputs[0].name: x}, batch_size)[self.outputs[0].name].astype(np.float32)


def _static_shape(shape: Any, where: str, name: str = "") -> tuple[int, ...]:
    dims = list(shape)
    label = f"input '{name}'" if name else "the model input"
    if not dims:
        raise IncompatibleError(f"{where}: {label} is a scalar", "edgekit converts models with batched tensor inputs.")
    rest = dims[1:]
    if any(d is None for d in rest):
        raise IncompatibleError(
            f"{where}: {label} has shape {tuple(dims)} with unknown dimensions besides the batch",
            "Export the model with a fixed input size (e.g. keras.Input((28, 28, 1))), or fix it with --input-shape NAME=1,....",
        )
    return (1, *(int(d) for d in rest))


def _dtype_name(dtype: Any) -> str:
    name = getattr(dtype, "name", None) or str(dtype)
    return np.dtype(name.replace("tf.", "")).name


def _outs(out: Any) -> list[Any]:
    if isinstance(out, dict):
        return list(out.values())
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _load_keras(path: Path, workdir: Path, tf: Any) -> SourceModel:
    import keras

    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path}: not a Keras model archive (the .keras zip is damaged or truncated)", "Save the model again with model.save('model.keras').")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:  # Keras raises many types for a damaged file
        raise ModelLoadError(f"{path}: Keras cannot load this model ({type(e).__name__}: {str(e)[:200]})", "Check the file is a complete .keras/.h5 model saved by Keras.") from None
    return keras_source(model, path, workdir, tf, sha256_file(path))


def keras_source(model: Any, path: Path, workdir: Path, tf: Any, sha256: str) -> SourceModel:
    """A SourceModel over a loaded Keras model (file sources and the Python API)."""
    inputs = tuple(TensorSpec(name=t.name, shape=_static_shape(t.shape, str(path), t.name), dtype=_dtype_name(t.dtype)) for t in model.inputs)
    if len({s.name for s in inputs}) != len(inputs):
        raise IncompatibleError(f"{path}: two model inputs share a name ({[s.name for s in inputs]})", "Name every keras.Input uniquely.")
    # Keras' SavedModel export names the outputs output_0, output_1, ... in model.outputs order; so do we.
    outputs = tuple(TensorSpec(name=f"output_{i}", shape=(1, *(int(d) if d is not None else -1 for d in t.shape[1:])), dtype=_dtype_name(t.dtype))
                    for i, t in enumerate(model.outputs))
    specs = [tf.TensorSpec(s.shape, s.dtype, name=s.name) for s in inputs]

    def export() -> Path:
        export_dir = src.workdir / "source_saved_model"  # the run's work dir (the Python API sets it after creation)
        with captured_output():
            model.export(str(export_dir), format="tf_saved_model", input_signature=specs if len(specs) == 1 else [specs], verbose=False)
        return export_dir

    def run(feeds: Feeds) -> list[Any]:
        args = [feeds[s.name] for s in inputs]
        return [np.asarray(o) for o in _outs(model(args[0] if len(args) == 1 else args, training=False))]

    src = SourceModel(workdir=workdir, path=path, kind="keras", sha256=sha256, inputs=inputs, outputs=outputs,
                      param_count=int(model.count_params()), keras_model=model, _export=export, _run=run)
    return src


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
    if not kwargs:
        raise IncompatibleError(f"{path}: signature '{key}' has no inputs", "Export a signature with tensor inputs.")
    names = sorted(kwargs)
    inputs = tuple(TensorSpec(name=n, shape=_static_shape(kwargs[n].shape.as_list(), str(path), n), dtype=kwargs[n].dtype.name) for n in names)
    out_keys = sorted(sig.structured_outputs)
    outputs = tuple(TensorSpec(name=k, shape=(1, *(int(d) if d is not None else -1 for d in sig.structured_outputs[k].shape.as_list()[1:])),
                               dtype=sig.structured_outputs[k].dtype.name) for k in out_keys)
    specs = [tf.TensorSpec(s.shape, getattr(tf, s.dtype), name=s.name) for s in inputs]

    module = tf.Module()
    module.inner = loaded
    module.serve = tf.function(lambda *a: {k: v for k, v in sig(**dict(zip(names, a))).items()}, input_signature=specs)

    def export() -> Path:
        export_dir = workdir / "source_saved_model"
        tf.saved_model.save(module, str(export_dir), signatures={"serving_default": module.serve})
        return export_dir
    params = int(sum(np.prod(v.shape) for v in getattr(loaded, "variables", [])))
    dynamic_batch = all(kwargs[n].shape.as_list()[:1] == [None] for n in names)

    def run(feeds: Feeds) -> list[Any]:
        if dynamic_batch:
            out = sig(**{n: tf.constant(feeds[n]) for n in names})
            return [np.asarray(out[k]) for k in out_keys]
        n_ex = len(feeds[names[0]])
        parts = [sig(**{n: tf.constant(feeds[n][i : i + 1]) for n in names}) for i in range(n_ex)]
        return [np.concatenate([np.asarray(p[k]) for p in parts]) for k in out_keys]

    return SourceModel(workdir=workdir, path=path, kind="saved_model", sha256=sha256_file(path), inputs=inputs, outputs=outputs,
                       param_count=params, _export=export, _run=run)


def load_source(path: str | os.PathLike[str], workdir: Path, input_shapes: dict[str, tuple[int, ...]] | None = None) -> SourceModel:
    """Load a .keras/.h5/.onnx/.pt2 file or a SavedModel directory for the converters.

    ``input_shapes`` pins dynamic dimensions per input name ("" for the only input).
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file or directory", "Check the model path.")
    if p.is_file() and p.suffix not in (".keras", ".h5", ".hdf5", ".onnx", ".pt2"):
        raise ModelLoadError(
            f"{p}: '{p.suffix or p.name}' is not a model format edgekit converts",
            "Pass a .keras/.h5/.onnx/.pt2 file or a SavedModel directory.",
        )
    if p.suffix == ".onnx":
        from converters.onnx_source import load_onnx_source

        return load_onnx_source(p, workdir, input_shapes)
    if p.suffix == ".pt2":
        from converters.torch_source import load_torch_source

        return load_torch_source(p, workdir, input_shapes)
    if input_shapes:
        raise UsageError("--input-shape applies to ONNX and PyTorch sources", "Keras and SavedModel sources carry their own static shapes.")
    tf = import_tensorflow()
    return _load_keras(p, workdir, tf) if p.is_file() else _load_saved_model(p, workdir, tf)
