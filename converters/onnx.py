"""Static INT8 ONNX (QDQ) with ONNX Runtime's quantizer, laid out for the profile's execution provider, packaged in the ORT
format for mobile.

Recipes: MinMax / percentile / entropy ranges, per-channel or per-tensor weights, cross-layer equalization and empirical
bias correction (``onnx_transforms``), and the most quantization-sensitive nodes kept in float where the EP runs mixed
graphs fast. The layout (weight dtype, symmetry, per-channel, float logits, ORT optimization style and target) follows
``onnx_layout.ep_layout``.
"""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from converters.base import Converter, ModelFacts, Recipe, RecipeOptions, check_weight_budget, weight_byte_metrics
from converters.coverage_runtime import ort_float_ops
from converters.onnx_calibration import CalibrationReader, calibration_cache_path, calibration_stride, mse_ranges
from converters.onnx_export import compact_names, embed_preprocessing, export_float_onnx
from converters.onnx_graph import peak_live_bytes, sensitive_nodes
from converters.onnx_layout import EPLayout, ep_layout
from converters.onnx_transforms import global_average_pools_in_file
from converters.source import Feeds, SourceModel
from edgekit.errors import ConversionError, IncompatibleError, RuntimeUnavailableError
from edgekit.manifest import TensorSpec
from edgekit.nativelog import captured_output
from edgekit.profiles import HardwareProfile, ONNXConstraints

__all__ = ["ONNXConverter", "ONNXOptions", "compact_names", "embed_preprocessing", "export_float_onnx", "peak_live_bytes", "sensitive_nodes"]

# Bias correction runs the probe graphs once per corrected layer over at most this many calibration samples.
BIAS_CORRECTION_SAMPLES = 128

# Histogram calibrators keep every tensor's histogram in memory; cap their samples on small hosts.
HISTOGRAM_SAMPLES = 200
# The QDQ debugger keeps every intermediate tensor of both graphs for each sample it ranks on.
SENSITIVITY_SAMPLES = 16
_QDQ = {"QuantizeLinear", "DequantizeLinear"}
# With float logits the head's Softmax already runs in float: keeping it says nothing new.
_HEAD_OPS = {"Softmax", "LogSoftmax", "Sigmoid"}


def _replays(path: Path) -> bool:
    """Whether ONNX Runtime here can replay the saved runtime optimizations of an ORT-format file."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
    try:
        with captured_output():
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's own Fail type
        if "runtime optimization" in str(e):
            return False
        raise ConversionError(f"ONNX Runtime cannot load the ORT-format model: {str(e).strip().splitlines()[-1][:200]}",
                              "Another recipe may work; see the attempts.") from e
    return True


def _constraints(profile: HardwareProfile) -> ONNXConstraints:
    c = profile.formats.onnx
    if c is None:
        raise IncompatibleError(
            f"profile '{profile.id}' does not take ONNX models (it supports: {', '.join(profile.formats.supported()) or 'nothing'})",
            "Pick a profile with an 'onnx' format, or another --format.",
        )
    return c


def _ort():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise RuntimeUnavailableError("onnx/onnxruntime are not installed, so ONNX models cannot be built",
                                      "Install the conversion tools with: pip install 'edgekit[convert]'") from None
    return onnx, onnxruntime


@dataclass(frozen=True)
class ONNXOptions(RecipeOptions):
    """ONNX recipe options: ranges, graph transforms, and the layout the profile's EP takes."""

    # how each tensor's range is picked: ONNX Runtime's calibrators, or "MSE" (least squared error on its histograms, mse_ranges)
    method: Literal["MinMax", "Percentile", "Entropy", "MSE"] = "MinMax"
    cle: bool = False  # cross-layer equalization of the float graph before calibration
    bias_correction: bool = False  # empirical per-layer bias correction of the QDQ graph on calibration data
    float_output: bool = False  # graph outputs leave the last layer's accumulator as float (no requantized logits)
    layout: Literal["qdq", "qoperator"] = "qdq"

    def __post_init__(self) -> None:
        if self.layout == "qoperator" and (self.bias_correction or self.float_output):
            raise ValueError("bias_correction and float_output rewrite QDQ graphs; the qoperator layout has none")


def _options(recipe: Recipe) -> ONNXOptions:
    o = recipe.options
    return o if isinstance(o, ONNXOptions) else ONNXOptions(calibration_all=o.calibration_all, keep_sensitive=o.keep_sensitive, embed=o.embed)


def _layout_words(layout: EPLayout, act: str) -> str:
    return f"{layout.quant_format.upper()} for {layout.ep.removesuffix('ExecutionProvider')}, {layout.weight_type} weights, {act} activations"


class ONNXConverter(Converter):
    """Static QDQ INT8 with quant_pre_process + quantize_static, then the ORT format."""

    format = "onnx"
    suffix = ".ort"
    sources = ("keras", "saved_model", "onnx", "torch")

    def check(self, source: SourceModel, profile: HardwareProfile) -> list[str]:
        _constraints(profile)
        _ort()
        check_weight_budget(source, profile)
        return []

    def recipes(self, profile: HardwareProfile, calibration_count: int, calibration_cap: int) -> list[Recipe]:
        c = _constraints(profile)
        lay = ep_layout(profile)
        act = c.activation_dtype
        pc = lay.per_channel
        words = _layout_words(lay, act)
        wl = "per-channel" if pc else "per-tensor"
        head = ", float logits" if lay.float_output else ""

        def opts(**kw) -> ONNXOptions:
            return ONNXOptions(float_output=lay.float_output, layout=lay.quant_format, **kw)

        def recipe(name: str, what: str, per_channel: bool = pc, **kw) -> Recipe:
            return Recipe(name, f"{what}; {words}{head}", activations=act, per_channel=per_channel, options=opts(**kw))

        out = [
            # bias correction first: on four depthwise CNNs it cut the output error 13.2 -> 3.6 (mean) and never lost more
            # than 0.4 pt (docs/decisions.md), so the search, which stops at the first recipe within budget, starts there
            recipe(f"qdq-minmax-{wl}-bc", f"MinMax, {wl}, empirical bias correction", bias_correction=True),
            recipe(f"qdq-minmax-{wl}", f"MinMax ranges, {wl} weights", method="MinMax"),
            recipe(f"qdq-minmax-{wl}-cle-bc", f"MinMax, {wl}, cross-layer equalization + empirical bias correction", cle=True,
                   bias_correction=True),
        ]
        if pc:
            out += [recipe("qdq-minmax-per-tensor", "MinMax, per-tensor weights", per_channel=False),
                    recipe("qdq-minmax-per-tensor-cle-bc", "MinMax, per-tensor, cross-layer equalization + bias correction",
                           per_channel=False, cle=True, bias_correction=True)]
        out += [
            recipe(f"qdq-percentile-{wl}-bc", f"99.999th-percentile ranges, {wl}, bias correction", method="Percentile",
                   bias_correction=True),
            recipe(f"qdq-mse-{wl}-bc", f"least-squared-error ranges, {wl}, bias correction", method="MSE", bias_correction=True),
            recipe(f"qdq-entropy-{wl}", f"entropy (KL) ranges, {wl}", method="Entropy"),
        ]
        if lay.mixed_precision:  # float islands cost little on this EP; never on full-integer accelerators
            out += [recipe(f"qdq-minmax-{wl}-keep{k}", f"MinMax, {wl}; the {k} node(s) whose outputs have the worst quantization "
                           "SQNR kept in float", keep_sensitive=k) for k in (1, 2, 3)]
        return out

    def _float(self, source: SourceModel, profile: HardwareProfile) -> Path:
        cache = source.workdir / "onnx"
        cache.mkdir(exist_ok=True)
        return export_float_onnx(source, _constraints(profile).opset, cache)

    def convert(self, source: SourceModel, profile: HardwareProfile, recipe: Recipe, calibration: Feeds, out: Path) -> Path:
        onnx, ort = _ort()
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        c = _constraints(profile)
        lay = ep_layout(profile)
        o = _options(recipe)
        float_path = self._float(source, profile)
        pre = source.workdir / "onnx" / f"{float_path.stem}-pre.onnx"
        if not pre.exists():
            with captured_output():
                quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
            source.cache["onnx_global_pools"] = global_average_pools_in_file(pre)  # the graph every recipe quantizes
        model = onnx.load(str(pre), load_external_data=False)
        dtypes = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name for v in model.graph.input}
        src = self._equalized(pre) if o.cle else pre
        method = o.method
        data = {k: v[:HISTOGRAM_SAMPLES] for k, v in calibration.items()} if method != "MinMax" else calibration
        qdq = out / "model.onnx"
        act = QuantType.QUInt8 if recipe.activations == "uint8" else QuantType.QInt8
        exclude: list[str] = []
        k = recipe.options.keep_sensitive
        if k:
            try:
                ranked = self._sensitive(source, pre, CalibrationReader(calibration, dtypes), {k: v[:SENSITIVITY_SAMPLES] for k, v in calibration.items()},
                                         act, recipe.per_channel)
            except Exception as e:  # the QDQ debugger is best-effort on unusual graphs
                raise ConversionError(f"sensitivity analysis failed: {str(e)[:200]}", "The other recipes are unaffected.") from e
            op_of = {n.name: n.op_type for n in model.graph.node}
            exclude = [n for n in ranked if not (o.float_output and op_of.get(n) in _HEAD_OPS)][:k]
        extra = {"CalibMovingAverage": False, "ActivationSymmetric": act == QuantType.QInt8 and lay.activation_symmetric,
                 "WeightSymmetric": True, **calibration_stride(len(next(iter(data.values()))), source)}
        if method == "Percentile":
            extra["CalibPercentile"] = 99.999
        weight = QuantType.QUInt8 if lay.weight_type == "uint8" else QuantType.QInt8
        cache = calibration_cache_path(source, src, method, data, extra, act, weight)
        try:
            if method == "MSE" and not cache.exists():  # our ranges in ONNX Runtime's cache, which quantize_static then reads as MinMax's
                mse_ranges(src, CalibrationReader(data, dtypes), extra, cache)
            with captured_output():
                quantize_static(str(src), str(qdq), CalibrationReader(data, dtypes), quant_format=QuantFormat.QDQ if o.layout == "qdq" else QuantFormat.QOperator,
                                per_channel=recipe.per_channel, activation_type=act, weight_type=weight,
                                calibrate_method=getattr(CalibrationMethod, "MinMax" if method == "MSE" else method), nodes_to_exclude=exclude,
                                extra_options=extra, calibration_cache_path=str(cache))
        except Exception as e:  # the quantizer raises assorted types on odd graphs
            raise ConversionError(f"ONNX Runtime quantization ({recipe.name}) failed: {str(e)[:300]}", "Run with --debug for details.") from e
        if o.bias_correction or o.float_output:
            self._rewrite(source, src, qdq, {k: v.astype(dtypes[k], copy=False) if k in dtypes else v for k, v in calibration.items()}, o)
        try:  # the quantizer can emit graphs ORT rejects (seen: Gemm bias DequantizeLinear with uint8 activations)
            with captured_output():
                ort.InferenceSession(str(qdq), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ConversionError(f"ONNX Runtime's quantizer produced a graph ONNX Runtime cannot load ({recipe.name}): "
                                  f"{str(e).strip().splitlines()[-1][:200]}", "Another recipe may work; see the attempts.") from e
        embed = recipe.options.embed
        if embed is not None:
            embed_preprocessing(qdq, embed)
        if not c.ort_format:
            return qdq
        return self._to_ort(qdq, out, lay)

    def _equalized(self, pre: Path) -> Path:
        """``pre`` after cross-layer equalization (computed once per run)."""
        import onnx

        from converters.onnx_transforms import equalize_cross_layer

        path = pre.with_name(f"{pre.stem}-cle.onnx")
        if not path.exists():
            m = onnx.load(str(pre), load_external_data=False)
            equalize_cross_layer(m)
            onnx.save(m, str(path))
        return path

    def _rewrite(self, source: SourceModel, float_path: Path, qdq: Path, calibration: Feeds, o: ONNXOptions) -> None:
        """Bias correction and the float head, on the QDQ file in place."""
        import onnx

        from converters.onnx_transforms import correct_bias, dequantize_head

        m = onnx.load(str(qdq), load_external_data=False)
        try:
            if o.bias_correction:
                correct_bias(float_path, m, calibration, qdq.parent / "bias-correction", max_samples=BIAS_CORRECTION_SAMPLES)
            if o.float_output:
                dequantize_head(m)
        except Exception as e:  # ORT's own error types from the probe sessions
            raise ConversionError(f"bias correction failed: {str(e)[:200]}", "The other recipes are unaffected; run with --debug.") from e
        finally:
            shutil.rmtree(qdq.parent / "bias-correction", ignore_errors=True)
        onnx.save(m, str(qdq))

    def _sensitive(self, source: SourceModel, pre: Path, reader: CalibrationReader, probe_feeds: Feeds, act, per_channel: bool) -> list[str]:
        """Sensitivity ranking of ``pre``'s nodes, computed once per run and activation type."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        key = f"{pre.stem}-{act.name}-{per_channel}"
        cache = source.cache.setdefault("onnx_sensitivity", {})
        if key not in cache:
            work = source.workdir / "onnx" / f"sens-{key}"
            work.mkdir(exist_ok=True)
            probe = work / "probe.onnx"
            with captured_output():
                quantize_static(str(pre), str(probe), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                activation_type=act, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                                extra_options=calibration_stride(len(reader), source))
            cache[key] = sensitive_nodes(pre, probe, probe_feeds, work)
        return cache[key]

    def _to_ort(self, qdq: Path, out: Path, lay: EPLayout) -> Path:
        """The ORT-format file: 'Runtime' style where the EP claims QDQ node units itself, else 'Fixed' (fusions stored).

        The target platform matters: for 'arm' the converter allows int8-activation QDQ fusions (session.qdqisint8allowed=1,
        as ONNX Runtime on arm64 does at load); for other targets it applies the x86 rules, under which the Runtime style
        replays int8-activation Conv groups unfused (measured here: DQ -> float Conv -> Q on the ds-CNN), and 'amd64'
        stores the x86-only NCHWc layout.
        """
        import onnxruntime as ort

        target = self._convert_ort(qdq, out, lay)
        if lay.ort_style == "runtime" and not _replays(target):
            # ORT 1.32 saves records it cannot replay on some graphs ("Not enough produced nodes in the runtime optimization
            # record", MobileNetV2); unreplayed, every QDQ group runs in float (2.85x float latency measured). Store the
            # groups pre-fused into QLinear* ops by ORT's own optimizer (no layout passes), which need no replay.
            fused = out / "prefused" / "model.onnx"
            fused.parent.mkdir(exist_ok=True)
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            so.add_session_config_entry("session.qdqisint8allowed", "1" if lay.target_platform == "arm" else "0")
            so.optimized_model_filepath = str(fused)
            so.log_severity_level = 3
            with captured_output():
                ort.InferenceSession(str(qdq), so, providers=["CPUExecutionProvider"])
            target = self._convert_ort(fused, out, lay)
            shutil.rmtree(fused.parent, ignore_errors=True)
        return target

    def _convert_ort(self, qdq: Path, out: Path, lay: EPLayout) -> Path:
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

        style = OptimizationStyle.Runtime if lay.ort_style == "runtime" else OptimizationStyle.Fixed
        ort_dir = out / "ort"
        ort_dir.mkdir(exist_ok=True)
        try:
            with captured_output():
                convert_onnx_models_to_ort(qdq, output_dir=ort_dir, optimization_styles=[style], target_platform=lay.target_platform)
        except Exception as e:
            raise ConversionError(f"conversion to the ORT format failed: {str(e).strip().splitlines()[-1][:200]}",
                                  "Set ort_format: false in the profile to ship plain ONNX.") from e
        produced = next(ort_dir.glob("*.ort"), None)
        config = next(ort_dir.glob("*.required_operators*.config"), None)
        if produced is None or config is None:
            raise ConversionError("ONNX Runtime did not write the ORT-format model", "Run with --debug for details.")
        target = out / "model.ort"
        produced.replace(target)
        config.replace(out / "required_operators.config")
        shutil.rmtree(ort_dir, ignore_errors=True)
        return target

    def convert_float(self, source: SourceModel, out: Path) -> Path:
        # The baseline is the float ONNX a user would ship (opset 17), from the run's one cached export.
        cache = source.workdir / "onnx"
        cache.mkdir(exist_ok=True)
        path = out / "float.onnx"
        shutil.copyfile(export_float_onnx(source, 17, cache), path)
        return path

    def activation_bytes(self, model_path: Path) -> int | None:
        onnx, _ = _ort()
        path = model_path.with_suffix(".onnx") if model_path.suffix == ".ort" else model_path
        return peak_live_bytes(onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False)).graph)

    def inspect(self, model_path: Path, profile: HardwareProfile) -> ModelFacts:
        onnx, _ = _ort()
        from onnx import numpy_helper

        qdq = model_path.with_suffix(".onnx")
        model = onnx.shape_inference.infer_shapes(onnx.load(str(qdq)))
        g = model.graph
        inits = {i.name: i for i in g.initializer}

        def spec(v) -> TensorSpec:
            t = v.type.tensor_type
            dims = tuple(int(d.dim_value) if d.dim_value else -1 for d in t.shape.dim)
            return TensorSpec(name=v.name, shape=dims, dtype=onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name)

        act_bytes = peak_live_bytes(g)
        int8_bytes = sum(numpy_helper.to_array(i).nbytes for i in g.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8))
        float_bytes = sum(numpy_helper.to_array(i).nbytes for i in g.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))
        from onnxruntime.quantization.registry import QDQRegistry

        quantizable = set(QDQRegistry)
        graph_inputs = {v.name for v in g.input}
        dq_outputs = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
        # Compute nodes the quantizer could have wrapped but did not (constant-only subgraphs don't count).
        float_nodes = [f"{n.op_type} '{n.name}'" for n in g.node if n.op_type not in _QDQ and n.op_type in quantizable
                       and not any(i in dq_outputs for i in n.input if i) and not all(i in inits for i in n.input if i)
                       and not any(i in graph_inputs for i in n.input)]  # input-layout reshapes run before the first Quantize
        unquantizable = sorted({n.op_type for n in g.node if n.op_type not in _QDQ and n.op_type not in quantizable})
        warnings = []
        if float_nodes:
            warnings.append(f"left in float: {', '.join(float_nodes)}")
        ran = ort_float_ops(model_path) if unquantizable else set()  # the shipped file; ORT fuses some anyway (QLinearGlobalAveragePool)
        still = [t for t in unquantizable if ran is None or t in ran]
        if still:
            how = "(not run here: whether ONNX Runtime fuses them is not measured)" if ran is None else \
                "and ONNX Runtime's CPU EP runs them in float between Q/DQ pairs (measured here)"
            warnings.append(f"op types the ORT quantizer has no int8 rule for {how}: {', '.join(still)}")
        extra = tuple(p for p in (model_path.parent / "required_operators.config",) if p.exists() and model_path.suffix == ".ort")
        lay = ep_layout(profile)
        notes = [f"ONNX layout for {lay.ep}: {lay.rule} ({lay.source}); "
                 + ("verified here" if lay.verified_here else "not verified here (this host runs only the CPU EP)")]
        if lay.target_platform == "arm" and platform.machine() in ("x86_64", "AMD64") and profile.formats.onnx.activation_dtype == "int8":
            notes.append("host latency of this int8-activation model uses x86-64 MLAS S8S8 kernels, several times slower than its "
                         "U8S8 ones (measured here on MobileNetV3Small); the arm64 device's kernels are not measured here")
        return ModelFacts(
            inputs=tuple(spec(v) for v in g.input if v.name not in inits),
            outputs=tuple(spec(v) for v in g.output),
            ops=tuple(n.op_type for n in g.node),
            activation_bytes=act_bytes,
            activation_note="peak of the activation tensors alive at once in execution order (buffers freed after their last use, "
                            "as ONNX Runtime's arena does)",
            metrics=weight_byte_metrics(int8_bytes, float_bytes, "int8/uint8 initializers", "float initializers (scales, biases, excluded layers)"),
            extra_files=extra,
            notes=tuple(notes),
            warnings=tuple(warnings),
        )
