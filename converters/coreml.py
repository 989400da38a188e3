"""Core ML ML Program packages (.mlpackage) with coremltools; int8 weights, W8A8 where Core ML runs.

The source is the static batch-1 SavedModel every converter gets. coremltools 9 converts neither
a Keras 3 model object (AttributeError inside its TF frontend) nor a Keras 3 SavedModel directory
("Only a single concrete function is supported"), so the one path, for Keras and SavedModel
sources alike, is the SavedModel's ``serving_default`` signature, itself a concrete function:
``ct.convert([fn], source="tensorflow", convert_to="mlprogram", ...)``.

What a Linux host can and cannot do (coremltools 9.0): conversion, ``linear_quantize_weights``
and reading the package's spec work; ``MLModel.predict`` and activation calibration
(``linear_quantize_activations``) need Core ML's runtime, which exists only on macOS. So on
Linux the model is W8A16 (int8 weights, float16 compute) and its numerics are unverified; on
a Mac the W8A8 recipe (activations calibrated on real data) is offered first.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from converters.base import Converter, ModelFacts, Recipe, check_weight_budget, weight_byte_metrics
from converters.source import Feeds, SourceModel, import_tensorflow
from edgekit.errors import ConversionError, IncompatibleError, RuntimeUnavailableError
from edgekit.manifest import Metric, TensorSpec
from edgekit.nativelog import captured_output
from edgekit.profiles import CoreMLConstraints, HardwareProfile

__all__ = ["CoreMLConverter", "W8A8", "W8A16", "WEIGHT_THRESHOLD", "stable_package_ids"]

W8A8 = Recipe("w8a8-per-channel", "int8 per-channel weights, int8 per-tensor activations calibrated by Core ML (W8A8)",
              weights="int8", activations="int8")
W8A16 = Recipe("w8-per-channel", "int8 per-channel weights, float16 activations (W8A16)", weights="int8", activations="float16")

# coremltools quantizes a weight only if it has MORE than `weight_threshold` elements; it never
# touches 1-D tensors (biases) or tensors under 10 elements. Apple's default of 2048 leaves every
# small layer in float (on an 8x8-digits CNN, everything but the 288x32 dense kernel). 32 makes
# every conv/linear kernel with more than 32 weights int8 (a 3x3 kernel from 4+ channels), while
# smaller tensors, whose per-channel scales would cost about what int8 saves, stay float.
WEIGHT_THRESHOLD = 32

_MACOS_ONLY = "Core ML models predict only on macOS; numerics unverified on this host"
_NOT_MEASURABLE = "unverified on this host: Core ML predicts only on macOS"
# MIL proto DataType names -> numpy dtype names (tensors edgekit measures; others are skipped).
_MIL_DTYPES = {"FLOAT16": "float16", "FLOAT32": "float32", "FLOAT64": "float64", "BFLOAT16": "bfloat16",
               "INT8": "int8", "UINT8": "uint8", "INT16": "int16", "UINT16": "uint16", "INT32": "int32",
               "UINT32": "uint32", "INT64": "int64", "UINT64": "uint64", "BOOL": "bool"}
_ITEMSIZE = {"bfloat16": 2, **{n: np.dtype(n).itemsize for n in _MIL_DTYPES.values() if n != "bfloat16"}}
_FLOATS = {"float16", "float32", "float64", "bfloat16"}
# Key of the quantized data in each weight-decompression op (iOS16/17 and iOS18+ spellings).
_QUANTIZED_DATA_KEYS = ("quantized_data", "data")


def _constraints(profile: HardwareProfile) -> CoreMLConstraints:
    c = profile.formats.coreml
    if c is None:
        supported = profile.formats.supported()
        raise IncompatibleError(
            f"profile '{profile.id}' does not take Core ML models (it supports: {', '.join(supported) or 'nothing'})",
            f"Use --format {supported[0]} for this profile." if supported else "Pick another profile.",
        )
    return c


def _coremltools() -> Any:
    """Import coremltools quietly (it prints a line per missing macOS proxy), or say how to install it."""
    try:
        with captured_output():
            import coremltools as ct
    except ImportError:
        raise RuntimeUnavailableError(
            "coremltools is not installed, so Core ML packages cannot be built or inspected",
            "Install the conversion tools with: pip install 'edgekit[convert]'",
        ) from None
    return ct


def _target(ct: Any, c: CoreMLConstraints, profile_id: str) -> Any:
    """The profile's deployment target as a coremltools target; ML Programs need iOS15/macOS12 or later."""
    try:
        target = ct.target[c.minimum_deployment_target]
    except KeyError:
        raise IncompatibleError(
            f"profile '{profile_id}': coremltools {ct.__version__} knows no deployment target '{c.minimum_deployment_target}'",
            f"Use one of: {', '.join(ct.target.__members__)}.",
        ) from None
    if target.value < ct.target.iOS15.value:
        raise IncompatibleError(
            f"profile '{profile_id}': ML Programs need iOS15/macOS12 or later, not {c.minimum_deployment_target}",
            "Raise formats.coreml.minimum_deployment_target in the profile to iOS15 or later.",
        )
    return target


def _w8a8_possible(ct: Any, c: CoreMLConstraints) -> bool:
    """Activation quantize/dequantize ops need the iOS17 opset."""
    target = ct.target.__members__.get(c.minimum_deployment_target)
    return target is not None and target.value >= ct.target.iOS17.value


class CoreMLConverter(Converter):
    """Keras/SavedModel to an ML Program .mlpackage: int8 per-channel weights, W8A8 on macOS."""

    format = "coreml"
    suffix = ".mlpackage"
    sources = ("keras", "saved_model", "torch")

    def runs_here(self) -> tuple[bool, str]:
        if sys.platform == "darwin":
            return True, ""
        return False, _MACOS_ONLY

    def check(self, source: SourceModel, profile: HardwareProfile) -> list[str]:
        c = _constraints(profile)
        ct = _coremltools()
        _target(ct, c, profile.id)
        if source.kind == "onnx":
            raise IncompatibleError(f"{source.path.name}: Core ML packages are built from Keras or SavedModel sources, not {source.kind}",
                                    "Pass the .keras file or SavedModel the ONNX model was exported from.")
        check_weight_budget(source, profile)
        warnings: list[str] = []
        if sys.platform != "darwin":
            warnings.append("Core ML: activations can only be calibrated with Core ML's runtime (macOS), so this host builds "
                            "W8A16 (int8 weights, float16 activations); build on a Mac for W8A8")
        if c.compute_units != "ALL":
            warnings.append(f"Core ML: compute units {c.compute_units} are a load-time setting, not stored in the package; "
                            "the app must set MLModelConfiguration.computeUnits")
        return warnings

    def recipes(self, profile: HardwareProfile, calibration_count: int, calibration_cap: int) -> list[Recipe]:
        c = _constraints(profile)
        if sys.platform == "darwin" and _w8a8_possible(_coremltools(), c):
            return [W8A8, W8A16]
        return [W8A16]

    def _program(self, ct: Any, source: SourceModel, precision: Any, **kwargs: Any) -> Any:
        """Convert the source's serving signature (or its ExportedProgram) to an ML Program with float32 I/O (like the source)."""
        if source.torch_program is not None:
            return self._program_from_torch(ct, source, precision, **kwargs)
        tf = import_tensorflow()
        loaded = tf.saved_model.load(str(source.saved_model_dir))
        fn = loaded.signatures["serving_default"]
        inputs = [ct.TensorType(name=s.name, shape=s.shape, dtype=np.dtype(s.dtype).type) for s in source.inputs]
        outputs = [ct.TensorType(dtype=np.float32) for _ in source.outputs]
        # Several outputs must be named (coremltools refuses unnamed ones): the signature's graph outputs, which follow its
        # sorted output keys, put in the source's order (e.g. the app's softmax, then the logits kept by converters.confidence).
        by_key = dict(zip(sorted(fn.structured_outputs), (t.name.split(":")[0] for t in fn.outputs)))
        if len(source.outputs) > 1 and all(s.name in by_key for s in source.outputs):
            outputs = [ct.TensorType(name=by_key[s.name], dtype=np.float32) for s in source.outputs]
        with captured_output() as log:
            try:
                # float32 I/O keeps the source's interface and the golden set's dtype; coremltools would
                # otherwise give a FLOAT16 program float16 I/O for iOS16+ targets.
                model = ct.convert([fn], source="tensorflow", convert_to="mlprogram", compute_precision=precision,
                                   inputs=inputs, outputs=outputs, **kwargs)
            except Exception as e:  # the converter raises NotImplementedError, ValueError, RuntimeError...
                err = e
            else:
                err = None
        if err is not None:
            detail = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
            raise ConversionError(f"coremltools could not convert the model: {detail}",
                                  "The model has ops coremltools cannot convert; run with --debug for the converter log.") from err
        del log
        return model

    def _program_from_torch(self, ct: Any, source: SourceModel, precision: Any, **kwargs: Any) -> Any:
        """coremltools straight from the ExportedProgram (after ATen decompositions), outputs named like the source's."""
        program = source.torch_program.run_decompositions({})
        inputs = [ct.TensorType(name=s.name, shape=s.shape, dtype=np.dtype(s.dtype).type) for s in source.inputs]
        outputs = [ct.TensorType(name=s.name, dtype=np.float32) for s in source.outputs]
        kwargs.setdefault("minimum_deployment_target", ct.target.iOS17)  # ExportedProgram conversion needs iOS17+ ops
        with captured_output():
            try:
                return ct.convert(program, convert_to="mlprogram", compute_precision=precision, inputs=inputs, outputs=outputs, **kwargs)
            except Exception as e:  # NotImplementedError for unsupported ATen ops, ValueError...
                detail = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
                raise ConversionError(f"coremltools could not convert the ExportedProgram: {detail}",
                                      "The model has ops coremltools cannot convert; run with --debug for the converter log.") from e

    def convert(self, source: SourceModel, profile: HardwareProfile, recipe: Recipe, calibration: Feeds, out: Path) -> Path:
        """W8A16: a FLOAT16 program with int8 weights; W8A8 also calibrates int8 activations (macOS only)."""
        c = _constraints(profile)
        ct = _coremltools()
        import coremltools.optimize.coreml as cto

        if recipe.activations == "int8" and sys.platform != "darwin":
            raise RuntimeUnavailableError(
                f"recipe {recipe.name} calibrates activations by running the model, and Core ML runs only on macOS",
                "Build on a Mac for W8A8, or use the w8-per-channel recipe here.",
            )
        target = _target(ct, c, profile.id)
        model = self._program(ct, source, ct.precision.FLOAT16, minimum_deployment_target=target,
                              compute_units=ct.ComputeUnit[c.compute_units])
        granularity = "per_channel" if recipe.per_channel else "per_tensor"
        weights = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity=granularity,
            weight_threshold=WEIGHT_THRESHOLD))
        with captured_output() as log:
            try:
                if recipe.activations == "int8":
                    # Core ML's activation quantizer is per-tensor (min/max of each tensor over the samples).
                    acts = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                                                                            granularity="per_tensor"))
                    n = len(next(iter(calibration.values())))
                    samples = [{k: v[i : i + 1] for k, v in calibration.items()} for i in range(n)]
                    model = cto.linear_quantize_activations(model, acts, samples)
                model = cto.linear_quantize_weights(model, weights)
            except Exception as e:  # coremltools raises ValueError, RuntimeError, bare Exception...
                err = e
            else:
                err = None
        if err is not None:
            raise ConversionError(f"Core ML quantization ({recipe.name}) failed: {str(err).strip()[:300]}",
                                  "Run with --debug for the coremltools log.") from err
        del log
        model.user_defined_metadata["com.edgekit.recipe"] = recipe.name
        model.user_defined_metadata["com.edgekit.profile"] = profile.id
        path = out / f"model{self.suffix}"
        model.save(str(path))
        stable_package_ids(path)
        return path

    def convert_float(self, source: SourceModel, out: Path) -> Path:
        """The float baseline: a FLOAT32 ML Program at coremltools' default target (iOS15).

        A plain ``ct.convert`` would give FLOAT16 (half this size). FLOAT32 is used so that the
        size ratio means the same in every format (int8 weights against float32 weights, as for
        TFLite and ONNX) and so the baseline's numerics are the source's; against the FLOAT16
        default, int8 weights save about 2x, not 4x (inspect's notes say so).
        """
        ct = _coremltools()
        model = self._program(ct, source, ct.precision.FLOAT32)
        path = out / f"float{self.suffix}"
        model.save(str(path))
        stable_package_ids(path)
        return path

    def inspect(self, model_path: Path, profile: HardwareProfile) -> ModelFacts:
        """Read the package's spec (nothing runs): I/O, MIL ops, int8/float weight bytes, activation estimate.

        ``ops`` are the main function's MIL ops in execution order without ``const`` ops (they only
        hold weights and parameters; their count is in the notes). Weight-decompression ops
        (``constexpr_*``) are kept: they are real ops the runtime must support. ``activation_bytes``
        sums the function inputs and the outputs of every op that is neither ``const`` nor
        ``constexpr_*``, at their declared dtype, without buffer reuse (an upper bound; tensors
        with unknown dimensions count 0).
        """
        ct = _coremltools()
        with captured_output():
            try:
                mlmodel = ct.models.MLModel(str(model_path), skip_model_load=True)
            except Exception as e:  # protobuf DecodeError, missing Manifest.json, ...
                err = e
            else:
                err = None
        if err is not None:
            raise ConversionError(f"{model_path.name}: coremltools cannot load the package: {str(err)[:300]}",
                                  "Rebuild the package with 'edgekit convert'.") from err
        spec = mlmodel.get_spec()
        if spec.WhichOneof("Type") != "mlProgram":
            raise ConversionError(f"{model_path.name}: not an ML Program (spec type {spec.WhichOneof('Type')})", "Rebuild the package.")
        from coremltools.proto import FeatureTypes_pb2, MIL_pb2

        array_dtypes = {v: k.lower() for k, v in FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.items()}
        array_dtypes[FeatureTypes_pb2.ArrayFeatureType.DOUBLE] = "float64"

        def io_spec(f) -> TensorSpec:
            a = f.type.multiArrayType
            return TensorSpec(name=f.name, shape=tuple(int(s) for s in a.shape), dtype=array_dtypes.get(a.dataType, "unknown"))

        main = spec.mlProgram.functions["main"]
        block = main.block_specializations[main.opset]
        program = list(_walk(block.operations))
        tensor = partial(_tensor, MIL_pb2.DataType.Name)

        w = _tally(program, tensor)
        _check_blobs(model_path, Path(mlmodel.weights_dir), w.blobs)
        int8_tensors, int8_bytes, float_bytes, int8_ops = w.int8_tensors, w.int8_bytes, w.float_bytes, w.int8_ops
        act_bytes = sum(t[1] * _ITEMSIZE[t[0]] for v in main.inputs if (t := tensor(v)))
        act_bytes += sum(t[1] * _ITEMSIZE[t[0]] for op in program if not _holds_weights(op) for o in op.outputs if (t := tensor(o)))

        ops = tuple(op.type for op in program if op.type != "const")
        n_const = len(program) - len(ops)
        metrics: list[tuple[str, Metric]] = [
            ("int8_weight_tensors", Metric(value=float(int8_tensors), unit="tensors", status="measured",
                                           note=f"int8 weight tensors in the package ({', '.join(sorted(int8_ops)) or 'none'})")),
            *weight_byte_metrics(int8_bytes, float_bytes, "int8 weight data, from the ML Program spec (zero points and scales excluded)",
                                 "float16/float32 constants left: biases, quantization scales, unquantized weights"),
        ]
        notes = [
            f"Core ML package loads with coremltools {ct.__version__}: yes (ML Program, specification version "
            f"{spec.specificationVersion}, opset {main.opset}); computation {_compute_dtype(block, tensor)}",
            f"weights int8: {int8_tensors} tensors, {int8_bytes:,} B ({', '.join(sorted(int8_ops)) or 'none'}); "
            f"float constants left: {float_bytes:,} B",
        ]
        accels = profile.accelerators_for(self.format)
        if accels:
            on = sum(op in accels[0].supported_ops for op in ops)
            notes.append(f"ops on the {accels[0].id} list: {on}/{len(ops)} (const ops, which only hold weights, not counted: {n_const})")
        if int8_tensors:
            notes.append("size: the float baseline is a FLOAT32 package; a default (FLOAT16) ct.convert package is about half "
                         "of it, so against that default int8 weights save about 2x")
        ok, _ = self.runs_here()
        if not ok:
            metrics.append(("numerics", Metric(value=None, status="not_measurable", note=_NOT_MEASURABLE)))
            notes.append(f"numerics: {_NOT_MEASURABLE} ({sys.platform})")
        return ModelFacts(
            inputs=tuple(io_spec(f) for f in spec.description.input),
            outputs=tuple(io_spec(f) for f in spec.description.output),
            ops=ops,
            activation_bytes=act_bytes,
            metrics=tuple(metrics),
            notes=tuple(notes),
        )


@dataclass
class _WeightTally:
    """What the program's constants hold."""

    int8_tensors: int = 0
    int8_bytes: int = 0
    float_bytes: int = 0
    int8_ops: dict[str, int] = field(default_factory=dict)
    blobs: list[tuple[str, int]] = field(default_factory=list)  # (fileName, offset) of every weight-file value


_PACKAGE_NAMESPACE = uuid.UUID("6f1c3d2e-5a4b-4c8d-9e0f-1a2b3c4d5e6f")  # edgekit's namespace for package item ids


def stable_package_ids(package: Path) -> None:
    """Make an .mlpackage byte-for-byte reproducible: replace the random ``uuid4`` item identifiers
    coremltools writes into ``Manifest.json`` with ``uuid5`` ids derived from each item's path and
    content, so the same model converts to the same sha256 (and so the same signed bundle).

    The package's own format allows any UUID string as an item identifier; only the mapping
    between ``itemInfoEntries`` and ``rootModelIdentifier`` matters, and it is kept.
    """
    from edgekit.bundle import sha256_file

    manifest_path = package / "Manifest.json"
    doc = json.loads(manifest_path.read_text())
    entries = doc.get("itemInfoEntries", {})
    renamed: dict[str, str] = {}
    for old, info in entries.items():
        item = package / "Data" / str(info.get("path", ""))
        digest = sha256_file(item) if item.exists() else ""
        renamed[old] = str(uuid.uuid5(_PACKAGE_NAMESPACE, f"{info.get('path', '')}\0{digest}")).upper()
    if len(set(renamed.values())) != len(renamed):  # two items with the same path and content: keep coremltools' ids
        return
    doc["itemInfoEntries"] = {renamed[k]: entries[k] for k in sorted(entries, key=lambda k: renamed[k])}
    if doc.get("rootModelIdentifier") in renamed:
        doc["rootModelIdentifier"] = renamed[doc["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(doc, indent=4, sort_keys=True) + "\n")


def _holds_weights(op: Any) -> bool:
    return op.type == "const" or op.type.startswith("constexpr_")


def _tally(program: list[Any], tensor: Callable[[Any], tuple[str, int] | None]) -> _WeightTally:
    """int8 weight data of the constexpr_* decompression ops and the float constants left, each counted once."""
    const_values = {op.outputs[0].name: op.attributes["val"] for op in program if op.type == "const"}
    feeds_constexpr = {b.name for op in program if op.type.startswith("constexpr_")
                       for arg in op.inputs.values() for b in arg.arguments if b.WhichOneof("binding") == "name"}

    def values(op: Any) -> Iterator[tuple[str, Any]]:
        """Every (key, Value) an op holds: attributes (iOS16/17 constexpr ops) and inline or const-bound inputs (iOS18)."""
        for key, v in op.attributes.items():
            if key != "name":
                yield key, v
        for key, arg in op.inputs.items():
            for b in arg.arguments:
                if b.WhichOneof("binding") == "value":
                    yield key, b.value
                elif op.type.startswith("constexpr_") and b.name in const_values:
                    yield key, const_values[b.name]

    w = _WeightTally()
    for op in program:
        if not _holds_weights(op) or (op.type == "const" and op.outputs[0].name in feeds_constexpr):
            continue  # a const feeding a constexpr op is counted through that op
        for key, v in values(op):
            if v.WhichOneof("value") == "blobFileValue":
                w.blobs.append((v.blobFileValue.fileName, int(v.blobFileValue.offset)))
            t = tensor(v)
            if t is None:
                continue
            dtype, n = t
            if op.type.startswith("constexpr_") and key in _QUANTIZED_DATA_KEYS and dtype in ("int8", "uint8"):
                w.int8_tensors += 1
                w.int8_bytes += n
                w.int8_ops[op.type] = w.int8_ops.get(op.type, 0) + 1
            elif dtype in _FLOATS:
                w.float_bytes += n * _ITEMSIZE[dtype]
    return w


def _check_blobs(model_path: Path, weights_dir: Path, blobs: list[tuple[str, int]]) -> None:
    """Every weight the spec points to lies inside a weight file of the package."""
    for name, offset in blobs:
        f = weights_dir / name.removeprefix("@model_path/weights/")
        if not f.is_file() or offset >= f.stat().st_size:
            raise ConversionError(f"{model_path.name}: the spec points to {name} at offset {offset}, which the package lacks",
                                  "The package is incomplete; rebuild it with 'edgekit convert'.")


def _walk(operations) -> Iterator[Any]:
    """Ops in execution order, descending into nested blocks (cond, while_loop) after their parent."""
    for op in operations:
        yield op
        for b in op.blocks:
            yield from _walk(b.operations)


def _tensor(dtype_name: Callable[[int], str], value: Any) -> tuple[str, int] | None:
    """(numpy dtype name, elements) of a MIL tensor value or named value with known dimensions, else None."""
    t = value.type.tensorType if value.type.WhichOneof("type") == "tensorType" else None
    if t is None or any(d.WhichOneof("dimension") != "constant" for d in t.dimensions):
        return None
    dtype = _MIL_DTYPES.get(dtype_name(t.dataType))
    return (dtype, int(np.prod([d.constant.size for d in t.dimensions], dtype=np.int64))) if dtype else None


def _compute_dtype(block: Any, tensor: Callable[[Any], tuple[str, int] | None]) -> str:
    """The float dtypes compute ops produce (float16 for a W8A16 program)."""
    seen = set()
    for op in _walk(block.operations):
        if op.type == "cast" or _holds_weights(op):
            continue
        for o in op.outputs:
            t = tensor(o)
            if t and t[0] in _FLOATS:
                seen.add(t[0])
    return "/".join(sorted(seen)) or "unknown"
