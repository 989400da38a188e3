"""Static INT8 ONNX (QDQ) with ONNX Runtime's quantizer, packaged in the ORT format for mobile."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from converters.base import Converter, ModelFacts, Recipe, check_weight_budget
from converters.source import Feeds, SourceModel, import_tensorflow
from edgekit.errors import ConversionError, IncompatibleError, RuntimeUnavailableError
from edgekit.manifest import Metric, Preprocessing, TensorSpec
from edgekit.nativelog import captured_output
from edgekit.profiles import HardwareProfile, ONNXConstraints

__all__ = ["ONNXConverter", "compact_names", "embed_preprocessing", "export_float_onnx", "peak_live_bytes", "sensitive_nodes"]

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


def export_float_onnx(source: SourceModel, opset: int, out: Path) -> Path:
    """The float source as an ONNX file with a static batch-1 input named like the source's."""
    path = out / f"float-opset{opset}.onnx"
    if path.exists():
        return path
    if source.kind in ("onnx", "torch"):
        shutil.copyfile(source.onnx_path if source.kind == "onnx" else source.cache["torch_onnx"](), path)
        compact_names(path)
        return path
    tf = import_tensorflow()
    import tf2onnx

    loaded = tf.saved_model.load(str(source.saved_model_dir))
    sig = loaded.signatures["serving_default"]
    names = source.input_names
    specs = [tf.TensorSpec(s.shape, getattr(tf, s.dtype), name=s.name) for s in source.inputs]
    # A dict out keeps the signature's output names (output_0, ...) as the ONNX graph's output names.
    fn = tf.function(lambda *a: dict(sig(**dict(zip(names, a)))))
    with captured_output() as log:
        try:
            tf2onnx.convert.from_function(fn, input_signature=specs, opset=opset, output_path=str(path))
        except Exception as e:  # tf2onnx raises bare Exceptions for unsupported ops
            err = e
        else:
            err = None
    if err is not None:
        raise ConversionError(f"tf2onnx could not export the model at opset {opset}: {str(err)[:300]}",
                              "Try a profile with a newer opset, or export ONNX yourself and pass the .onnx file.") from err
    del log
    _fold_constant_inputs(path)
    if _extra_inputs(path, source):
        # Seen with Keras 3 EfficientNet: from_function leaves the Normalization layer's mean/variance as graph
        # inputs without values. tf2onnx's SavedModel loader freezes them; it is slower, so it is the fallback.
        _export_saved_model_cli(source, opset, path)
        _fold_constant_inputs(path)
    compact_names(path)
    _check_inputs(path, source)
    return path


def _extra_inputs(path: Path, source: SourceModel) -> list[str]:
    import onnx

    names = {v.name for v in onnx.load(str(path), load_external_data=False).graph.input}
    return sorted(names - set(source.input_names))


def _export_saved_model_cli(source: SourceModel, opset: int, path: Path) -> None:
    """``python -m tf2onnx.convert --saved-model`` (variables frozen by tf2onnx's loader), I/O renamed to the source's names."""
    import subprocess
    import sys

    import onnx

    cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(source.saved_model_dir), "--output", str(path),
           "--opset", str(opset), "--signature_def", "serving_default"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if proc.returncode != 0:
        raise ConversionError(f"tf2onnx could not export the SavedModel at opset {opset}: {proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else proc.returncode}",
                              "Export ONNX yourself and pass the .onnx file.")
    model = onnx.load(str(path))
    g = model.graph
    rename = {v.name: v.name.split(":")[0] for v in [*g.input, *g.output] if ":" in v.name}
    if rename:
        for v in [*g.input, *g.output]:
            v.name = rename.get(v.name, v.name)
        for n in g.node:
            n.input[:] = [rename.get(i, i) for i in n.input]
            n.output[:] = [rename.get(o, o) for o in n.output]
        onnx.save(model, str(path))


def _fold_constant_inputs(path: Path) -> None:
    """Drop graph inputs that have initializers (tf2onnx leaves some constants, e.g. Normalization's, as inputs)."""
    import onnx

    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    keep = [v for v in model.graph.input if v.name not in inits]
    if len(keep) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(keep)
        onnx.save(model, str(path))


def _check_inputs(path: Path, source: SourceModel) -> None:
    """The export must take exactly the source's inputs."""
    import onnx

    got = sorted(v.name for v in onnx.load(str(path), load_external_data=False).graph.input)
    want = sorted(source.input_names)
    if got != want:
        raise ConversionError(f"the ONNX export takes inputs {got}, but the source takes {want}",
                              "The exporter turned constants into inputs or renamed them; export ONNX yourself and pass the .onnx file.")


def embed_preprocessing(path: Path, pre: Preprocessing) -> None:
    """Rewrite the model in place to take raw input: Cast -> Mul(scale) -> Sub(mean) -> Div(std) in plain ONNX ops."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    old = g.input[0]
    dims = [d.dim_value for d in old.type.tensor_type.shape.dim]
    raw_type = helper.np_dtype_to_tensor_dtype(np.dtype(pre.raw_dtype))
    raw = helper.make_tensor_value_info("raw", raw_type, dims)
    ndim = len(dims)
    consts = {
        "pre_scale": np.asarray(pre.scale, np.float32),
        "pre_mean": pre._broadcast(pre.mean, ndim).astype(np.float32),
        "pre_std": pre._broadcast(pre.std, ndim).astype(np.float32),
    }
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    nodes = [
        helper.make_node("Cast", ["raw"], ["pre_raw_f"], to=TensorProto.FLOAT, name="pre_cast"),
        helper.make_node("Mul", ["pre_raw_f", "pre_scale"], ["pre_scaled"], name="pre_mul"),
        helper.make_node("Sub", ["pre_scaled", "pre_mean"], ["pre_centered"], name="pre_sub"),
        helper.make_node("Div", ["pre_centered", "pre_std"], [old.name], name="pre_div"),
    ]
    for i, n in enumerate(nodes):
        g.node.insert(i, n)
    g.input.remove(old)
    g.input.insert(0, raw)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def compact_names(path: Path) -> None:
    """Rename nodes and intermediate tensors to short ids, in place.

    tf2onnx keeps TensorFlow's scoped names ('StatefulPartitionedCall/.../BiasAdd__8:0'); every QDQ
    node and scale repeats them, which on small models makes the INT8 file larger than the float one.
    Graph inputs and outputs keep their names.
    """
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    keep = {v.name for v in [*g.input, *g.output]}
    mapping: dict[str, str] = {}

    def short(name: str, prefix: str) -> str:
        if not name or name in keep:
            return name
        if name not in mapping:
            mapping[name] = f"{prefix}{len(mapping)}"
        return mapping[name]

    for init in g.initializer:
        init.name = short(init.name, "w")
    for vi in g.value_info:
        vi.name = short(vi.name, "t")
    for i, node in enumerate(g.node):
        node.name = f"{node.op_type.lower()}_{i}"
        node.input[:] = [short(n, "t") for n in node.input]
        node.output[:] = [short(n, "t") for n in node.output]
    onnx.save(model, str(path))


def sensitive_nodes(float_path: Path, qdq_path: Path, feeds: Feeds, work: Path) -> list[str]:
    """Nodes of the float graph ranked from most to least hurt by quantization.

    Both graphs run on the same inputs with every intermediate tensor as an output (ORT's QDQ
    debugger's graph rewrite); each float tensor's signal-to-quantization-noise ratio against its
    dequantized QDQ counterpart ranks its producer, lowest SQNR first. Streamed: one example at a
    time, only the running signal and noise sums are kept (ORT's ``collect_activations`` holds
    every intermediate tensor of every example, which grew past 3.7 GB on ResNet-50 with 8 samples).
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.qdq_loss_debug import modify_model_output_intermediate_tensors
    from onnxruntime.quantization.quant_utils import DEQUANT_OUTPUT_SUFFIX, QUANT_INPUT_SUFFIX

    aug_f, aug_q = work / "sens-float.onnx", work / "sens-qdq.onnx"
    with captured_output():
        modify_model_output_intermediate_tensors(str(float_path), str(aug_f))
        modify_model_output_intermediate_tensors(str(qdq_path), str(aug_q))
        sf = ort.InferenceSession(str(aug_f), providers=["CPUExecutionProvider"])
        sq = ort.InferenceSession(str(aug_q), providers=["CPUExecutionProvider"])
    f_names = [o.name for o in sf.get_outputs()]
    q_names = [o.name for o in sq.get_outputs()]
    saved = "_ReshapedSavedOutput"  # the debugger's flattened copy of each tensor
    f_key = {n.removesuffix(saved): n for n in f_names}
    q_key = {n.removesuffix(saved): n for n in q_names}
    pairs: dict[str, str] = {}  # float tensor -> the QDQ graph's dequantized version of it
    qset = set(q_key)
    for t in q_key:
        for suffix in (DEQUANT_OUTPUT_SUFFIX + "_1", DEQUANT_OUTPUT_SUFFIX):
            if t.endswith(suffix):
                pairs.setdefault(t[: -len(suffix)], t)
                break
        else:
            if t.endswith(QUANT_INPUT_SUFFIX) and t[: -len(QUANT_INPUT_SUFFIX)] in qset:
                pairs.setdefault(t[: -len(QUANT_INPUT_SUFFIX)], t[: -len(QUANT_INPUT_SUFFIX)])
    pairs = {k: v for k, v in pairs.items() if k in f_key}
    signal = dict.fromkeys(pairs, 0.0)
    noise = dict.fromkeys(pairs, 0.0)
    f_dtypes = {v.name: v.type for v in sf.get_inputs()}
    n = len(next(iter(feeds.values())))
    for i in range(n):
        one = {k: v[i : i + 1] for k, v in feeds.items()}
        fo = dict(zip(f_names, sf.run(f_names, {k: one[k] for k in f_dtypes})))
        qo = dict(zip(q_names, sq.run(q_names, {v.name: one[v.name] for v in sq.get_inputs()})))
        for t, qt in pairs.items():
            a, b = np.asarray(fo[f_key[t]], np.float64), np.asarray(qo[q_key[qt]], np.float64)
            if a.shape != b.shape:
                continue
            signal[t] += float((a * a).sum())
            noise[t] += float(((a - b) ** 2).sum())
        del fo, qo
    producer = {o: nd.name for nd in onnx.load(str(float_path), load_external_data=False).graph.node for o in nd.output}
    sqnr = {t: (10 * np.log10(signal[t] / noise[t]) if noise[t] > 0 and signal[t] > 0 else np.inf) for t in pairs}
    ranked = sorted((v, t) for t, v in sqnr.items() if t in producer and np.isfinite(v))
    return list(dict.fromkeys(producer[t] for _, t in ranked))


def peak_live_bytes(g) -> int:
    """Largest sum of tensor bytes alive at once when the graph's nodes run in order (inputs included, initializers not)."""
    import onnx

    inits = {i.name for i in g.initializer}
    sizes: dict[str, int] = {}
    for v in [*g.value_info, *g.input, *g.output]:
        t = v.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim]
        if v.name not in inits and all(dims) and t.elem_type:
            sizes[v.name] = int(np.prod(dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
    last_use: dict[str, int] = {}
    for idx, n in enumerate(g.node):
        for i in n.input:
            last_use[i] = idx
    keep = {o.name for o in g.output}
    live = sum(sizes.get(v.name, 0) for v in g.input)
    peak = live
    for idx, n in enumerate(g.node):
        live += sum(sizes.get(o, 0) for o in n.output)
        peak = max(peak, live)
        for name in {*n.input, *n.output}:
            if name in sizes and name not in keep and last_use.get(name, -1) <= idx:
                live -= sizes[name]
                sizes[name] = 0  # freed once
    return peak


class _Reader:
    """ONNX Runtime CalibrationDataReader over feeds (one array per input), one example per call."""

    def __init__(self, feeds: Feeds | str, dtypes: dict[str, str] | np.ndarray | None = None) -> None:
        if isinstance(feeds, str):  # the single-input form _Reader(name, x)
            feeds, dtypes = {feeds: np.asarray(dtypes)}, None
        assert isinstance(feeds, dict) and (dtypes is None or isinstance(dtypes, dict))
        self._feeds = {k: (v.astype(dtypes[k], copy=False) if dtypes and k in dtypes else v) for k, v in feeds.items()}
        self._n = len(next(iter(feeds.values())))
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= self._n:
            return None
        self._i += 1
        return {k: v[self._i - 1 : self._i] for k, v in self._feeds.items()}

    def rewind(self) -> None:
        self._i = 0

    def __iter__(self):  # the QDQ debugger iterates instead of calling get_next
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item


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
                   activations=act, per_channel=pc, options=(("method", "MinMax"),)),
        ]
        if pc:
            out.append(Recipe("qdq-minmax-per-tensor", f"QDQ, MinMax, per-tensor weights, {act} activations", activations=act, per_channel=False,
                              options=(("method", "MinMax"),)))
        out += [
            Recipe(f"qdq-percentile-{layout}", f"QDQ, 99.999th-percentile ranges, {layout}, {act} activations", activations=act, per_channel=pc,
                   options=(("method", "Percentile"),)),
            Recipe(f"qdq-entropy-{layout}", f"QDQ, entropy (KL) ranges, {layout}, {act} activations", activations=act, per_channel=pc,
                   options=(("method", "Entropy"),)),
        ]
        out += [
            Recipe(f"qdq-minmax-per-tensor-keep{k}", f"QDQ, MinMax, per-tensor; the {k} node(s) whose outputs have the worst quantization SQNR kept in float",
                   activations=act, per_channel=False, options=(("method", "MinMax"), ("exclude_sensitive", k)))
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
        method = str(recipe.option("method"))
        data = {k: v[:HISTOGRAM_SAMPLES] for k, v in calibration.items()} if method != "MinMax" else calibration
        qdq = out / "model.onnx"
        act = QuantType.QUInt8 if recipe.activations == "uint8" else QuantType.QInt8
        exclude: list[str] = []
        k = int(recipe.option("exclude_sensitive", 0) or 0)
        if k:
            try:
                exclude = self._sensitive(source, pre, _Reader(calibration, dtypes), {k: v[:SENSITIVITY_SAMPLES] for k, v in calibration.items()},
                                          act, recipe.per_channel)[:k]
            except Exception as e:  # the QDQ debugger is best-effort on unusual graphs
                raise ConversionError(f"sensitivity analysis failed: {str(e)[:200]}", "The other recipes are unaffected.") from e
        extra = {"CalibMovingAverage": False, "ActivationSymmetric": act == QuantType.QInt8 and "TensorrtExecutionProvider" in c.execution_providers,
                 # Streamed calibration: fold every chunk of intermediate outputs into the ranges, then drop it.
                 "CalibMaxIntermediateOutputs": int(source.cache.get("calibration_chunk", 64))}
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
        embed = recipe.option("embed")
        if isinstance(embed, Preprocessing):
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
                                extra_options={"CalibMaxIntermediateOutputs": int(source.cache.get("calibration_chunk", 64))})
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
