"""Static INT8 ONNX (QDQ) with ONNX Runtime's quantizer, packaged in the ORT format for mobile."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from converters.base import Converter, ModelFacts, Recipe, RecipeOptions, check_weight_budget
from converters.onnx_export import compact_names, embed_preprocessing, export_float_onnx
from converters.onnx_graph import peak_live_bytes, sensitive_nodes
from converters.source import Feeds, SourceModel
from edgekit.errors import ConversionError, IncompatibleError, RuntimeUnavailableError
from edgekit.manifest import Metric, Preprocessing, TensorSpec
from edgekit.nativelog import captured_output
from edgekit.profiles import HardwareProfile, ONNXConstraints

__all__ = ["ONNXConverter", "ONNXOptions", "compact_names", "embed_preprocessing", "export_float_onnx", "peak_live_bytes", "sensitive_nodes"]

# Histogram calibrators keep every tensor's histogram in memory; cap their samples on small hosts.
HISTOGRAM_SAMPLES = 200
# The QDQ debugger keeps every intermediate tensor of both graphs for each sample it ranks on.
SENSITIVITY_SAMPLES = 16
# Execution providers that partition QDQ groups themselves need the ORT "Runtime" optimization style.
_RUNTIME_STYLE_EPS = {"NnapiExecutionProvider", "CoreMLExecutionProvider", "XnnpackExecutionProvider", "QNNExecutionProvider"}
_QDQ = {"QuantizeLinear", "DequantizeLinear"}


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


class _Reader:
    """ONNX Runtime CalibrationDataReader over feeds (one array per input), one example per call."""

    def __init__(self, feeds: Feeds | str, dtypes: dict[str, str] | np.ndarray | None = None) -> None:
        if isinstance(feeds, str):  # the single-input form _Reader(name, x)
            feeds, dtypes = {feeds: np.asarray(dtypes)}, None
        assert isinstance(feeds, dict) and (dtypes is None or isinstance(dtypes, dict))
        self._feeds = {k: (v.astype(dtypes[k], copy=False) if dtypes and k in dtypes else v) for k, v in feeds.items()}
        self._n = len(next(iter(feeds.values())))
        self._i, self._end = 0, self._n

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= self._end:
            return None
        self._i += 1
        return {k: v[self._i - 1 : self._i] for k, v in self._feeds.items()}

    def __len__(self) -> int:
        return self._n

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve examples [start_index, end_index) next (ONNX Runtime's CalibStridedMinMax streaming)."""
        self._i, self._end = start_index, min(end_index, self._n)

    def rewind(self) -> None:
        self._i, self._end = 0, self._n

    def __iter__(self):  # the QDQ debugger iterates instead of calling get_next
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item


def _stride(n: int, source: SourceModel) -> dict[str, int]:
    """Streamed calibration: ONNX Runtime's ``CalibStridedMinMax`` runs the calibrator on ``stride`` examples at a time and
    folds each chunk into the ranges (or histograms) before the next; the stride must divide the sample count.

    (Not ``CalibMaxIntermediateOutputs``: in ONNX Runtime 1.32 MinMax drops every full chunk unmeasured and histogram
    calibrators ignore it.)
    """
    chunk = max(1, int(source.cache.get("calibration_chunk", 16)))
    if n <= chunk:
        return {}
    stride = next(s for s in range(chunk, 0, -1) if n % s == 0)
    return {"CalibStridedMinMax": stride}


@dataclass(frozen=True)
class ONNXOptions(RecipeOptions):
    """ONNX recipe options: how ONNX Runtime's calibrator picks each tensor's range."""

    method: Literal["MinMax", "Percentile", "Entropy"] = "MinMax"


def _options(recipe: Recipe) -> ONNXOptions:
    o = recipe.options
    return o if isinstance(o, ONNXOptions) else ONNXOptions(calibration_all=o.calibration_all, keep_sensitive=o.keep_sensitive, embed=o.embed)


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
        act = c.activation_dtype
        pc = c.per_channel
        layout = "per-channel" if pc else "per-tensor"
        out = [
            Recipe(f"qdq-minmax-{layout}", f"QDQ, MinMax calibration, {layout} int8 weights, {act} activations",
                   activations=act, per_channel=pc, options=ONNXOptions(method="MinMax")),
        ]
        if pc:
            out.append(Recipe("qdq-minmax-per-tensor", f"QDQ, MinMax, per-tensor weights, {act} activations", activations=act, per_channel=False,
                              options=ONNXOptions(method="MinMax")))
        out += [
            Recipe(f"qdq-percentile-{layout}", f"QDQ, 99.999th-percentile ranges, {layout}, {act} activations", activations=act, per_channel=pc,
                   options=ONNXOptions(method="Percentile")),
            Recipe(f"qdq-entropy-{layout}", f"QDQ, entropy (KL) ranges, {layout}, {act} activations", activations=act, per_channel=pc,
                   options=ONNXOptions(method="Entropy")),
        ]
        out += [
            Recipe(f"qdq-minmax-per-tensor-keep{k}", f"QDQ, MinMax, per-tensor; the {k} node(s) whose outputs have the worst quantization SQNR kept in float",
                   activations=act, per_channel=False, options=ONNXOptions(method="MinMax", keep_sensitive=k))
            for k in (1, 2, 3)
        ]
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
        float_path = self._float(source, profile)
        pre = source.workdir / "onnx" / f"{float_path.stem}-pre.onnx"
        if not pre.exists():
            with captured_output():
                quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre), load_external_data=False)
        dtypes = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name for v in model.graph.input}
        method = _options(recipe).method
        data = {k: v[:HISTOGRAM_SAMPLES] for k, v in calibration.items()} if method != "MinMax" else calibration
        qdq = out / "model.onnx"
        act = QuantType.QUInt8 if recipe.activations == "uint8" else QuantType.QInt8
        exclude: list[str] = []
        k = recipe.options.keep_sensitive
        if k:
            try:
                exclude = self._sensitive(source, pre, _Reader(calibration, dtypes), {k: v[:SENSITIVITY_SAMPLES] for k, v in calibration.items()},
                                          act, recipe.per_channel)[:k]
            except Exception as e:  # the QDQ debugger is best-effort on unusual graphs
                raise ConversionError(f"sensitivity analysis failed: {str(e)[:200]}", "The other recipes are unaffected.") from e
        extra = {"CalibMovingAverage": False, "ActivationSymmetric": act == QuantType.QInt8 and "TensorrtExecutionProvider" in c.execution_providers,
                 **_stride(len(next(iter(data.values()))), source)}
        if method == "Percentile":
            extra["CalibPercentile"] = 99.999
        try:
            with captured_output():
                quantize_static(str(pre), str(qdq), _Reader(data, dtypes), quant_format=QuantFormat.QDQ, per_channel=recipe.per_channel,
                                activation_type=act, weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method),
                                nodes_to_exclude=exclude, extra_options=extra)
        except Exception as e:  # the quantizer raises assorted types on odd graphs
            raise ConversionError(f"ONNX Runtime quantization ({recipe.name}) failed: {str(e)[:300]}", "Run with --debug for details.") from e
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
        return self._to_ort(qdq, out, c)

    def _sensitive(self, source: SourceModel, pre: Path, reader: _Reader, probe_feeds: Feeds, act, per_channel: bool) -> list[str]:
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
                                extra_options=_stride(len(reader), source))
            cache[key] = sensitive_nodes(pre, probe, probe_feeds, work)
        return cache[key]

    def _to_ort(self, qdq: Path, out: Path, c: ONNXConstraints) -> Path:
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

        style = OptimizationStyle.Runtime if _RUNTIME_STYLE_EPS & set(c.execution_providers) else OptimizationStyle.Fixed
        ort_dir = out / "ort"
        ort_dir.mkdir(exist_ok=True)
        try:
            with captured_output():
                convert_onnx_models_to_ort(qdq, output_dir=ort_dir, optimization_styles=[style])
        except Exception as e:
            raise ConversionError(f"conversion to the ORT format failed: {str(e).strip().splitlines()[-1][:200]}",
                                  "Set ort_format: false in the profile to ship plain ONNX.") from e
        produced = next(ort_dir.glob("*.ort"), None)
        config = next(ort_dir.glob("*.required_operators*.config"), None)
        if produced is None or config is None:
            raise ConversionError("ONNX Runtime did not write the ORT-format model", "Run with --debug for details.")
        target = out / "model.ort"
        produced.rename(target)
        config.rename(out / "required_operators.config")
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
        if unquantizable:
            warnings.append(f"op types the ORT quantizer has no int8 rule for (run in float between QDQ pairs): {', '.join(unquantizable)}")
        extra = tuple(p for p in (model_path.parent / "required_operators.config",) if p.exists() and model_path.suffix == ".ort")
        return ModelFacts(
            inputs=tuple(spec(v) for v in g.input if v.name not in inits),
            outputs=tuple(spec(v) for v in g.output),
            ops=tuple(n.op_type for n in g.node),
            activation_bytes=act_bytes,
            activation_note="peak of the activation tensors alive at once in execution order (buffers freed after their last use, "
                            "as ONNX Runtime's arena does)",
            metrics=(
                ("int8_weight_bytes", Metric(value=float(int8_bytes), unit="B", status="measured", note="int8/uint8 initializers")),
                ("float_weight_bytes", Metric(value=float(float_bytes), unit="B", status="measured", note="float initializers (scales, biases, excluded layers)")),
            ),
            extra_files=extra,
            warnings=tuple(warnings),
        )
