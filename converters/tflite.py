"""Full-integer INT8 TFLite with TensorFlow's converter; checked with LiteRT."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from converters.base import Converter, ModelFacts, Recipe, RecipeOptions, check_weight_budget, weight_byte_metrics
from converters.source import Feeds, SourceModel, import_tensorflow
from converters.tflite_child import isolated, process_bytes, run_in_child
from edgekit.errors import ConversionError, IncompatibleError
from edgekit.manifest import QuantParams, TensorSpec
from edgekit.nativelog import captured_output
from edgekit.profiles import HardwareProfile, TFLiteConstraints
from edgekit.runtime.tflite import arena_span_bytes, constant_bytes, signature_names

__all__ = ["TFLiteConverter", "TFLiteOptions"]

_INT_TYPES = {"int8", "uint8", "int16", "int32", "int64", "bool"}


def _constraints(profile: HardwareProfile) -> TFLiteConstraints:
    c = profile.formats.tflite
    if c is None:
        raise IncompatibleError(
            f"profile '{profile.id}' does not take TFLite models (it supports: {', '.join(profile.formats.supported()) or 'nothing'})",
            f"Use --format {profile.formats.supported()[0]} for this profile." if profile.formats.supported() else "Pick another profile.",
        )
    return c


def _options(recipe: Recipe) -> TFLiteOptions:
    o = recipe.options
    return o if isinstance(o, TFLiteOptions) else TFLiteOptions(calibration_all=o.calibration_all, keep_sensitive=o.keep_sensitive, embed=o.embed)


def _xnnpack_only(profile: HardwareProfile) -> bool:
    """The profile's TFLite models run on XNNPACK alone (CPU; it runs float and int8 ops in one partition)."""
    accs = profile.accelerators_for("tflite")
    return bool(accs) and all(a.id == "xnnpack" and "float32" in a.dtypes for a in accs)


def _narrow_conv_outputs(calibrated: bytes) -> list[str]:
    """Output tensor names of the CONV_2D / DEPTHWISE_CONV_2D nodes with at most 3 input channels (an image model's stem)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    with captured_output():
        it = Interpreter(model_content=calibrated, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    details = {t["index"]: t for t in it.get_tensor_details()}
    out = []
    for op in it._get_ops_details():
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D") and len(op["inputs"]) and op["inputs"][0] >= 0:
            shape = details[int(op["inputs"][0])]["shape"]
            if len(shape) == 4 and 0 < int(shape[-1]) <= NARROW_CHANNELS:
                out.append(details[int(op["outputs"][0])]["name"])
    return out


NARROW_CHANNELS = 3  # stem convolutions on at most this many input channels stay float in int8-xnnpack-mixed


def _selective(tf, conv, io, float_ops: list[str], narrow_convs: bool, per_channel: bool) -> bytes:
    """Calibrate, then quantize with ``float_ops`` (and the stem convolutions) left in float32: the call TensorFlow's
    QuantizationDebugger makes (convert.mlir_quantize with denylisted_ops / denylisted_nodes), here with
    fully_quantize so the model's I/O keep the profile's dtype."""
    from tensorflow.lite.python import convert as tfl_convert

    conv._experimental_calibrate_only = True  # documented by the debugger's own use; no public selective-quantization API
    calibrated = conv.convert()
    nodes = _narrow_conv_outputs(calibrated) if narrow_convs else []
    return tfl_convert.mlir_quantize(calibrated, disable_per_channel=not per_channel, fully_quantize=True,
                                     input_data_type=io, output_data_type=io, denylisted_ops=float_ops or None,
                                     denylisted_nodes=nodes or None)


def _batch1_clone(source: SourceModel):
    """The Keras source rebuilt on batch-1 inputs that carry the source's input names and dtypes, for the transform recipes (None: it cannot be).

    ``from_keras_model`` on the clone names the signature's inputs after these ``keras.Input`` names and
    its outputs ``output_0``, ``output_1``... in ``model.outputs`` order, as Keras' SavedModel export
    (and so ``SourceModel.outputs``) does; ``_check_signature`` holds every conversion to that.
    """
    import keras

    model = source.keras_model
    try:
        inputs = [keras.Input(batch_shape=s.shape, dtype=s.dtype, name=s.name) for s in source.inputs]
        clone = keras.models.clone_model(model, input_tensors=inputs[0] if len(inputs) == 1 else inputs)
        clone.set_weights(model.get_weights())
    except Exception:  # subclassed or custom models: the transforms clone the source as it is
        return None
    if [t.name for t in clone.inputs] != list(source.input_names) or len(clone.outputs) != len(source.outputs):
        return None  # Keras renamed an input (a clash with a layer name): the SavedModel signature keeps the names
    return clone


def _check_signature(flat: bytes, source: SourceModel) -> None:
    """The converted model's signature names exactly the source's inputs and outputs (outputs are matched by name later)."""
    from ai_edge_litert.interpreter import Interpreter

    with captured_output():
        names = set(signature_names(Interpreter(model_content=flat)).values())
    want = set(source.input_names) | set(source.output_names)
    if names != want:
        raise ConversionError(f"the TFLite signature names {sorted(names)}, the source has {sorted(want)}",
                              "Name every keras.Input uniquely; run with --debug for the converter log.")


def _integer_input_entry_ops(interp, ops: list[dict]) -> set[int]:
    """Ops that only carry an integer graph input into the int8 graph: CAST(int input) and the QUANTIZE of that cast.

    A model that takes token ids, a sample rate or an integer state must turn them into numbers the
    int8 graph can use; that boundary is not a float op in the graph's body.
    """
    int_inputs = {d["index"] for d in interp.get_input_details() if np.dtype(d["dtype"]).kind in "iub" and not d["quantization"][0]}
    cast_outs: set[int] = set()
    entry: set[int] = set()
    for op in ops:
        ins = {int(i) for i in op["inputs"] if i >= 0}
        if op["op_name"] == "CAST" and ins and ins <= int_inputs:
            entry.add(op["index"])
            cast_outs |= {int(o) for o in op["outputs"]}
        elif op["op_name"] == "QUANTIZE" and ins and ins <= cast_outs:
            entry.add(op["index"])
    return entry


@dataclass(frozen=True)
class TFLiteOptions(RecipeOptions):
    """TFLite recipe options: the I/O dtype, 16x8 mode, and which of TensorFlow's quantizers runs."""

    io: Literal["int8", "uint8", "int16", "float32"] = "int8"
    int16x8: bool = False  # int16 activations, int8 weights (EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8)
    legacy_quantizer: bool = False  # TensorFlow's older quantizer and its range estimation
    # Applied to a clone of the Keras source before TensorFlow quantizes it (converters/keras_transforms.py):
    cle: bool = False  # cross-layer equalization (Nagel et al. 2019): same float function, even per-channel ranges
    bias_correction: bool = False  # empirical bias correction for the int8 error, layer by layer on the calibration data
    # Op types kept in float32 (selective quantization), only for profiles whose TFLite delegate is XNNPACK alone:
    # XNNPACK runs DEQUANTIZE -> float op -> QUANTIZE inside its partition, where an int8 op it lacks splits the graph.
    float_ops: tuple[str, ...] = ()
    # CONV_2D / DEPTHWISE_CONV_2D with <= 3 input channels (the stem) in float32: XNNPACK's int8 kernels for them
    # measured 3.5-7x slower than its float ones here (docs/decisions.md); same profiles as float_ops.
    float_narrow_convs: bool = False

    @property
    def xnnpack_islands(self) -> bool:
        return bool(self.float_ops) or self.float_narrow_convs

    @property
    def transforms(self) -> bool:
        return self.cle or self.bias_correction


class TFLiteConverter(Converter):
    """Post-training full-integer quantization (TFLITE_BUILTINS_INT8) with a representative dataset."""

    format = "tflite"
    suffix = ".tflite"

    def unavailable_for(self, source: SourceModel) -> str | None:
        if source.kind == "torch":
            # litert-torch 0.10 would be the route, but it pins pydantic/typing_extensions below what the
            # server needs and pulls jax and transformers (docs/decisions.md); it is not wired in.
            return ("tflite from PyTorch needs Google's litert-torch converter, which this edgekit does not drive; "
                    "build the onnx bundle for this profile (--format onnx), the supported PyTorch route")
        return super().unavailable_for(source)

    def child_process_bytes(self, source: SourceModel, recipe: Recipe) -> int:
        return process_bytes(source) if isolated(source) else 0

    def check(self, source: SourceModel, profile: HardwareProfile) -> list[str]:
        c = _constraints(profile)
        from converters.keras_transforms import count_hard_swish, count_narrow_convs

        # what recipes() offers for this source (the search calls check() right before recipes())
        self._hard_swish = count_hard_swish(source.keras_model) if source.keras_model is not None else 0
        self._narrow_convs = count_narrow_convs(source.keras_model, NARROW_CHANNELS) if source.keras_model is not None else 0
        warnings: list[str] = []
        check_weight_budget(source, profile)
        weights_mb = source.param_count / 1e6  # int8: one byte per weight
        for acc in profile.accelerators_for("tflite"):
            if c.full_integer and not ({"int8", "uint8"} & set(acc.dtypes)):
                raise IncompatibleError(f"accelerator '{acc.id}' of profile '{profile.id}' takes no int8 tensors", "Fix the profile's dtypes.")
            if acc.memory_mb is not None and weights_mb > acc.memory_mb:
                warnings.append(
                    f"{acc.name}: about {weights_mb:.1f} MB of int8 weights exceed its {acc.memory_mb:g} MB on-chip memory; "
                    "the rest streams from host memory at every inference"
                )
        return warnings

    def recipes(self, profile: HardwareProfile, calibration_count: int, calibration_cap: int) -> list[Recipe]:
        """Cheap and usually good first: TFLite's default, cross-layer equalization (weights only), bias
        correction (one extra pass over the calibration data), both, the per-tensor and calibration variants, and 16x8 only
        where an accelerator of the profile has int16x8 kernels (elsewhere it falls to slow reference kernels).
        """
        c = _constraints(profile)
        io = c.io_dtype
        out = [
            Recipe("int8-per-channel", "full int8, per-channel weights (TFLite default)", options=TFLiteOptions(io=io)),
            Recipe("int8-cle", "full int8, per-channel, cross-layer equalization (no data needed)", options=TFLiteOptions(io=io, cle=True)),
            Recipe("int8-bias-corrected", "full int8, per-channel, biases corrected for the int8 error on the calibration data",
                   options=TFLiteOptions(io=io, bias_correction=True)),
            Recipe("int8-cle-bias-corrected", "full int8, per-channel, cross-layer equalization then bias correction",
                   options=TFLiteOptions(io=io, cle=True, bias_correction=True)),
            Recipe("int8-per-tensor", "full int8, per-tensor weights", per_channel=False, options=TFLiteOptions(io=io)),
            Recipe("int8-per-tensor-cle-bias-corrected", "full int8, per-tensor weights, cross-layer equalization then bias correction",
                   per_channel=False, options=TFLiteOptions(io=io, cle=True, bias_correction=True)),
        ]
        hard_swish, narrow = getattr(self, "_hard_swish", 0), getattr(self, "_narrow_convs", 0)
        if (hard_swish or narrow) and _xnnpack_only(profile):
            # Where XNNPACK's int8 is missing or slow (measured, docs/decisions.md): LiteRT 2.3's XNNPACK has no int8
            # HARD_SWISH (each splits the graph; MobileNetV3Small int8 2.45x float, 0.86x with them in float), and its
            # int8 convolutions on 1-3 input channels run 3.5-7x slower than float (MNIST example int8 2.1x float, 0.72x).
            kept = [f"the {hard_swish} HARD_SWISH ops"] * bool(hard_swish) + [f"{narrow} stem convolution(s) on <= 3 channels"] * bool(narrow)
            islands = TFLiteOptions(io=io, float_ops=("HARD_SWISH",) if hard_swish else (), float_narrow_convs=bool(narrow),
                                    keep_sensitive=hard_swish + narrow)
            out.insert(1, Recipe("int8-xnnpack-mixed", f"full int8 except {' and '.join(kept)}, kept in float32 inside XNNPACK's partition",
                                 options=islands))
            out.insert(3, Recipe("int8-xnnpack-mixed-cle", "int8-xnnpack-mixed after cross-layer equalization",
                                 options=replace(islands, cle=True)))
        if calibration_count > calibration_cap:
            out.append(Recipe(f"int8-per-channel-all-{calibration_count}", f"full int8, per-channel, all {calibration_count} calibration samples",
                              options=TFLiteOptions(io=io, calibration_all=True)))
        out.append(Recipe("int8-legacy-calibrator", "full int8, per-channel, TFLite's legacy quantizer and its range estimation",
                          options=TFLiteOptions(io=io, legacy_quantizer=True)))
        if c.activations_int16 and any(a.int16x8_kernels for a in profile.accelerators_for("tflite")):
            out.append(Recipe("int16x8", "int8 weights with int16 activations (16x8 mode)", activations="int16",
                              options=TFLiteOptions(io="int16", int16x8=True)))
        return out

    def _transformed(self, tf, source: SourceModel, recipe: Recipe, calibration: Feeds) -> object:
        """A TFLite converter over a clone of the Keras source with the recipe's CLE / bias correction applied."""
        from converters.keras_transforms import transform_clone

        o = _options(recipe)
        if source.keras_model is None:
            raise ConversionError(f"recipe {recipe.name} transforms the Keras model, and this source is a SavedModel",
                                  "Pass the .keras file to use it; the other recipes work on SavedModels.")
        if "tflite_batch1_clone" not in source.cache:
            source.cache["tflite_batch1_clone"] = _batch1_clone(source)
        base = source.cache["tflite_batch1_clone"] or source.keras_model
        try:
            clone, _ = transform_clone(base, cle=o.cle, bias_correction=o.bias_correction,
                                       calibration=[np.asarray(calibration[s.name], dtype=s.dtype) for s in source.inputs],
                                       per_channel=recipe.per_channel, float_narrow=NARROW_CHANNELS if o.float_narrow_convs else 0)
        except Exception as e:  # a layer pattern the transforms cannot walk: this recipe fails, the others still run
            raise ConversionError(f"recipe {recipe.name}: the Keras transforms failed: {type(e).__name__}: {str(e)[:200]}",
                                  "The other recipes do not transform the model; run with --debug for details.") from e
        return tf.lite.TFLiteConverter.from_keras_model(clone)

    def _converter(self, tf, source: SourceModel) -> object:
        """A TFLite converter over the source's static batch-1 SavedModel, exported once per run and shared by every recipe.

        ``from_keras_model`` (on the batch-1 clone) writes and reloads a SavedModel of its own on every
        conversion: on a two-output MobileNetV3Small it took 6-9 s per int8 recipe against 3.4-5.7 s
        from the one export (3 s, paid once; docs/benchmarks.md). Only the recipes that transform
        the Keras model (CLE, bias correction) convert a clone.
        """
        return tf.lite.TFLiteConverter.from_saved_model(str(source.saved_model_dir))

    def convert(self, source: SourceModel, profile: HardwareProfile, recipe: Recipe, calibration: Feeds, out: Path) -> Path:
        if isolated(source):
            got = run_in_child(source, profile, recipe, calibration, out, transforms=_options(recipe).transforms)
            if got is not None:
                return got
        return self.convert_here(source, profile, recipe, calibration, out)

    def convert_here(self, source: SourceModel, profile: HardwareProfile, recipe: Recipe, calibration: Feeds, out: Path) -> Path:
        """``convert`` in this process."""
        tf = import_tensorflow()
        if _options(recipe).transforms:
            conv = self._transformed(tf, source, recipe, calibration)
        else:
            conv = self._converter(tf, source)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        data = calibration
        names = source.input_names
        n = len(data[names[0]])

        def representative():
            # One example at a time: TensorFlow's calibrator keeps only each tensor's running min/max. Keyed by the
            # signature's input names (the source's, on the clone too): a list would be fed in the TFLite graph's
            # input order, which need not be the source's.
            for i in range(n):
                yield {k: data[k][i : i + 1] for k in names}

        conv.representative_dataset = representative
        io = {"int8": tf.int8, "uint8": tf.uint8, "int16": tf.int16, "float32": tf.float32}[_options(recipe).io]
        if _options(recipe).int16x8:
            conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        elif _options(recipe).xnnpack_islands:
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        else:
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = io
        conv.inference_output_type = io
        if not recipe.per_channel:
            conv._experimental_disable_per_channel = True  # documented private switch; no public equivalent
        if _options(recipe).legacy_quantizer:
            conv.experimental_new_quantizer = False
        with captured_output() as log, warnings.catch_warnings():
            # "Statistics for quantized inputs were expected": the representative dataset provides them.
            warnings.simplefilter("ignore", UserWarning)
            try:
                if _options(recipe).xnnpack_islands:
                    flat = _selective(tf, conv, io, list(_options(recipe).float_ops), _options(recipe).float_narrow_convs, recipe.per_channel)
                else:
                    flat = conv.convert()
            except Exception as e:  # the converter raises ConverterError, RuntimeError, ValueError...
                err = e
            else:
                err = None
        if err is not None:
            detail = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
            raise ConversionError(
                f"TFLite conversion ({recipe.name}) failed: {detail}",
                "The model has ops without int8 kernels; run with --debug for the converter log.",
            ) from err
        del log
        _check_signature(flat, source)
        path = out / f"model{self.suffix}"
        path.write_bytes(flat)
        return path

    def convert_float(self, source: SourceModel, out: Path) -> Path:
        if isolated(source):
            got = run_in_child(source, None, None, None, out, transforms=False)
            if got is not None:
                return got
        return self.convert_float_here(source, out)

    def convert_float_here(self, source: SourceModel, out: Path) -> Path:
        """``convert_float`` in this process."""
        tf = import_tensorflow()
        conv = self._converter(tf, source)
        with captured_output():
            flat = conv.convert()
        _check_signature(flat, source)
        path = out / f"float{self.suffix}"
        path.write_bytes(flat)
        return path

    def activation_bytes(self, model_path: Path) -> int | None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        with captured_output():
            interp = Interpreter(model_path=str(model_path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
            interp.allocate_tensors()
        ids = {int(i) for op in interp._get_ops_details() for i in op["outputs"] if i >= 0} | {d["index"] for d in interp.get_input_details()}
        return arena_span_bytes(interp, ids)

    def inspect(self, model_path: Path, profile: HardwareProfile) -> ModelFacts:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        with captured_output():
            interp = Interpreter(model_path=str(model_path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
            interp.allocate_tensors()
        ops = interp._get_ops_details()  # the only API that lists the graph's ops
        names = signature_names(interp)

        def spec(d: dict) -> TensorSpec:
            scale, zp = d["quantization"]
            q = QuantParams(scale=float(scale), zero_point=int(zp)) if scale else None
            return TensorSpec(name=names.get(d["index"], d["name"]), shape=tuple(int(s) for s in d["shape"]), dtype=np.dtype(d["dtype"]).name,
                              quantization=q)

        activation_ids = {int(i) for op in ops for i in op["outputs"] if i >= 0}
        activation_ids |= {d["index"] for d in interp.get_input_details()}
        activation_bytes = arena_span_bytes(interp, activation_ids)
        consts = constant_bytes(interp)
        violations: list[str] = []
        warnings: list[str] = []
        c = profile.formats.tflite
        entry = _integer_input_entry_ops(interp, ops)
        kept_float: dict[str, int] = {}
        if c is not None and c.full_integer:
            for op in ops:
                types = {np.dtype(t).name for t in [*op["operand_types"], *op["result_types"]]}
                floats = sorted(types - _INT_TYPES)
                if not floats or op["index"] in entry or op["op_name"] == "DELEGATE":
                    continue
                if _xnnpack_only(profile):  # XNNPACK runs float ops too: a mixed graph, said as such, not a violation
                    kept_float[op["op_name"]] = kept_float.get(op["op_name"], 0) + 1
                else:
                    violations.append(f"{op['op_name']} (op {op['index']}) uses {', '.join(floats)}")
        if kept_float:
            warnings.append("mixed precision: " + ", ".join(f"{k} x{v}" for k, v in sorted(kept_float.items()))
                            + " in float32 (XNNPACK runs them in its partition; the rest is int8)")
        if entry:
            warnings.append(f"{len(entry)} op(s) at the model's entry cast integer inputs (ids, rates, state) to float and quantize them: "
                            "they run on the CPU, outside the accelerator's int8 path")
        return ModelFacts(
            inputs=tuple(spec(d) for d in interp.get_input_details()),
            outputs=tuple(spec(d) for d in interp.get_output_details()),
            ops=tuple(op["op_name"] for op in ops),
            warnings=tuple(warnings),
            activation_bytes=activation_bytes,
            activation_note="LiteRT's arena on this host after allocate_tensors (no delegate): activation buffers, shared buffers "
                            "counted once; a device delegate may plan its memory differently",
            dtype_violations=tuple(violations),
            metrics=weight_byte_metrics(consts.get("int8", 0) + consts.get("uint8", 0), consts.get("float32", 0) + consts.get("float16", 0),
                                        "int8/uint8 constant tensors", "float32/float16 constant tensors (layers kept in float)"),
        )
