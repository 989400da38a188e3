"""ONNX sources as they exist in the wild, normalised once before any converter sees them.

- IR < 4 graphs list every initializer as a graph input; exporters (tf2onnx on Keras
  Normalization layers) also leave constants as inputs with initializers. Both are folded:
  an input that has an initializer is a constant, not something a caller feeds.
- Opset < 13 is upgraded with ``onnx.version_converter`` to 13, the first opset whose
  QuantizeLinear/DequantizeLinear take the ``axis`` attribute that per-channel int8 needs.
- External data (``model.onnx`` + ``model.data``) is loaded from next to the file; a missing
  data file is named in the error.
- Batch and other dynamic dimensions are pinned (``--input-shape NAME=1,3,224,224``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from converters.source import Feeds, SourceModel
from edgekit.bundle import sha256_file
from edgekit.errors import IncompatibleError, ModelLoadError, UsageError
from edgekit.manifest import TensorSpec
from edgekit.nativelog import captured_output

__all__ = ["PER_CHANNEL_OPSET", "load_onnx_source", "normalise_onnx"]

PER_CHANNEL_OPSET = 13


def _external_files(model: Any) -> list[str]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    files = []
    for t in _get_all_tensors(model):
        if uses_external_data(t):
            files += [e.value for e in t.external_data if e.key == "location"]
    return sorted(set(files))


def _load(path: Path) -> Any:
    import onnx

    try:
        bare = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError and friends
        raise ModelLoadError(f"{path}: not a valid ONNX model ({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})",
                             "Export the model again, or check it with onnx.checker.check_model.") from None
    missing = [f for f in _external_files(bare) if not (path.parent / f).is_file()]
    if missing:
        raise ModelLoadError(f"{path}: the model keeps its weights in external data file(s) that are missing: {', '.join(missing)}",
                             f"Put {', '.join(missing)} next to {path.name} (ONNX external data is looked up relative to the model).")
    try:
        onnx.checker.check_model(str(path))
        return onnx.load(str(path))
    except Exception as e:  # ValidationError, ...
        raise ModelLoadError(f"{path}: not a valid ONNX model (onnx.checker: {str(e).strip().splitlines()[0][:200]})",
                             "Export the model again, or check it with onnx.checker.check_model.") from None


def normalise_onnx(model: Any) -> tuple[Any, list[str]]:
    """Fold initializer inputs, raise IR to >= 4 and opset to >= 13; returns the model and what was done."""
    import onnx

    notes: list[str] = []
    inits = {i.name for i in model.graph.initializer}
    folded = [v for v in model.graph.input if v.name in inits]
    if folded:
        keep = [v for v in model.graph.input if v.name not in inits]
        del model.graph.input[:]
        model.graph.input.extend(keep)
        notes.append(f"folded {len(folded)} graph input(s) that have initializers into constants"
                     + (f" (IR version {model.ir_version} lists weights as inputs)" if model.ir_version < 4 else ""))
    if model.ir_version < 4:
        notes.append(f"IR version {model.ir_version} raised to 4")
        model.ir_version = 4
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < PER_CHANNEL_OPSET:
        from onnx import version_converter

        try:
            upgraded = version_converter.convert_version(model, PER_CHANNEL_OPSET)
            onnx.checker.check_model(upgraded)
        except Exception as e:  # the converter has no adapter for some ops
            notes.append(f"opset {opset} kept: onnx.version_converter could not upgrade it to {PER_CHANNEL_OPSET} "
                         f"({str(e).strip().splitlines()[0][:120]}); per-channel recipes will fail")
        else:
            model = upgraded
            notes.append(f"opset {opset} upgraded to {PER_CHANNEL_OPSET} with onnx.version_converter (per-channel int8 needs it)")
    return model, notes


def _pin_shapes(model: Any, path: Path, input_shapes: dict[str, tuple[int, ...]]) -> None:
    graph_inputs = list(model.graph.input)
    names = [v.name for v in graph_inputs]
    shapes = dict(input_shapes)
    if "" in shapes:  # --input-shape without a name: the only input
        if len(names) != 1:
            raise UsageError(f"--input-shape without a name is ambiguous: the model has {len(names)} inputs ({', '.join(names)})",
                             "Name the input: --input-shape NAME=1,3,224,224 (repeat per input).")
        shapes[names[0]] = shapes.pop("")
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise UsageError(f"--input-shape names {', '.join(repr(u) for u in unknown)}, which the model has no input called "
                         f"(inputs: {', '.join(names)})", "Use the model's input names: --input-shape NAME=1,3,224,224.")
    for v in graph_inputs:
        dims = [d.dim_value if d.dim_value > 0 else None for d in v.type.tensor_type.shape.dim]
        if v.name in shapes:
            want = shapes[v.name]
            if len(want) != len(dims) or any(d is not None and d != s for d, s in zip(dims[1:], want[1:])):
                raise IncompatibleError(f"{path}: --input-shape {v.name}={','.join(map(str, want))} does not fit the model input "
                                        f"{tuple(d if d else '?' for d in dims)}", "Give one size per dimension, batch first.")
            static = (1, *want[1:]) if want else ()
        elif any(d is None for d in dims[1:]):
            raise IncompatibleError(f"{path}: input '{v.name}' has dynamic dimensions {tuple(d if d else '?' for d in dims)}",
                                    f"Fix them with --input-shape, e.g. --input-shape {v.name}=1,3,224,224.")
        else:
            static = (1, *(int(d) for d in dims[1:])) if dims else ()
        for d, size in zip(v.type.tensor_type.shape.dim, static):
            d.ClearField("dim_param")
            d.dim_value = size


def load_onnx_source(path: Path, workdir: Path, input_shapes: dict[str, tuple[int, ...]] | None = None) -> SourceModel:
    """Load, normalise and pin an ONNX model; the SourceModel runs it with ONNX Runtime."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise ModelLoadError("onnx/onnxruntime are not installed, so .onnx models cannot be converted",
                             "Install the conversion tools with: pip install 'edgekit[convert]'") from None
    model, notes = normalise_onnx(_load(path))
    if not model.graph.input:
        raise IncompatibleError(f"{path}: the model has no inputs besides constants", "Export a model that takes an input.")
    _pin_shapes(model, path, input_shapes or {})
    fixed = workdir / "source.onnx"
    if model.ByteSize() > 1_800_000_000:  # protobuf's 2 GB limit: keep the weights beside the graph
        onnx.save(model, str(fixed), save_as_external_data=True, location="source.onnx.data")
    else:
        onnx.save(model, str(fixed))
    try:
        with captured_output():
            session = ort.InferenceSession(str(fixed), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load the model ({str(e).strip().splitlines()[-1][:200]})",
                             "Check the model runs with onnxruntime.InferenceSession.") from None
    from edgekit.runtime.onnx import ort_dtype

    inputs = tuple(TensorSpec(name=v.name, shape=tuple(int(d) for d in v.shape), dtype=ort_dtype(v.type)) for v in session.get_inputs())
    inferred = {}
    try:
        shaped = onnx.shape_inference.infer_shapes(onnx.load(str(fixed), load_external_data=False))
        inferred = {v.name: tuple(d.dim_value if d.dim_value > 0 else -1 for d in v.type.tensor_type.shape.dim) for v in shaped.graph.output}
    except Exception:  # shape inference is a nicety for the report
        pass
    outputs = tuple(TensorSpec(name=v.name, shape=(1, *inferred.get(v.name, tuple(d if isinstance(d, int) else -1 for d in v.shape))[1:]),
                               dtype=ort_dtype(v.type)) for v in session.get_outputs())
    out_names = [s.name for s in outputs]

    def run(feeds: Feeds) -> list[np.ndarray]:
        n = len(next(iter(feeds.values())))
        parts = [session.run(out_names, {s.name: feeds[s.name][i : i + 1].astype(s.dtype, copy=False) for s in inputs}) for i in range(n)]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(out_names))]

    from onnx import numpy_helper

    params = int(sum(int(np.prod(i.dims)) for i in model.graph.initializer))
    del numpy_helper
    src = SourceModel(path=path, kind="onnx", sha256=sha256_file(path), inputs=inputs, outputs=outputs, param_count=params,
                      workdir=workdir, onnx_path=fixed, _run=run)
    src.cache["source_notes"] = notes
    return src
