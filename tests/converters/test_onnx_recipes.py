"""ONNX INT8 recipes on real depthwise-separable MNIST CNNs: cross-layer equalization, empirical bias correction,
per-channel with the most sensitive nodes kept in float, float logits, and the layout each execution provider takes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from converters.base import Recipe

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "tests" / "onnx-recipes-v1"
# Two held-out-style variants: different seeds and widths (first conv, pointwise 1, pointwise 2).
VARIANTS = {"ds-a": (0, 8, 16, 24), "ds-b": (1, 12, 12, 32)}


def _ds_cnn(name: str) -> dict[str, Path]:
    """Train (once, cached) a depthwise-separable CNN with global average pooling on the bundled MNIST subset; export ONNX."""
    d = CACHE / name
    files = {"model": d / "model.keras", "onnx": d / "float.onnx", "calib": d / "calib.npz", "eval": d / "eval.npz"}
    if all(p.exists() for p in files.values()):
        return files
    import keras

    from converters.onnx_export import export_float_onnx
    from converters.source import load_source
    from examples.mnist.train import load_mnist, split

    seed, w1, w2, w3 = VARIANTS[name]
    keras.utils.set_random_seed(seed)
    parts = split(*load_mnist())
    L = keras.layers
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(w1, 3, strides=2, activation="relu"),
        L.DepthwiseConv2D(3, activation="relu"),
        L.Conv2D(w2, 1, activation="relu"),
        L.DepthwiseConv2D(3, strides=2, activation="relu"),
        L.Conv2D(w3, 1, activation="relu"),
        L.GlobalAveragePooling2D(),
        L.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(*parts["train"], epochs=6, batch_size=64, verbose=0)
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save(tmp / "model.keras")
    np.savez(tmp / "calib.npz", x=parts["calib"][0][:200], y=parts["calib"][1][:200])
    np.savez(tmp / "eval.npz", x=parts["eval"][0][:300], y=parts["eval"][1][:300])
    work = tmp / "work"
    work.mkdir()
    shutil.copyfile(export_float_onnx(load_source(tmp / "model.keras", work), 17, work), tmp / "float.onnx")
    shutil.rmtree(work)
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    return files


@pytest.fixture(scope="session", params=sorted(VARIANTS))
def ds_cnn(request) -> dict[str, Path]:
    return _ds_cnn(request.param)


@pytest.fixture(scope="session")
def ds_pre(ds_cnn, tmp_path_factory) -> Path:
    """The float graph as the converter quantizes it (ORT's quant_pre_process)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = tmp_path_factory.mktemp("pre") / "pre.onnx"
    quant_pre_process(str(ds_cnn["onnx"]), str(out), skip_symbolic_shape=True)
    return out


def _run(path: Path | bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(path if isinstance(path, bytes) else str(path), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


def _quantize(pre: Path, out: Path, x: np.ndarray, *, per_channel: bool) -> Path:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from converters.onnx_calibration import CalibrationReader

    name = onnx.load(str(pre)).graph.input[0].name
    quantize_static(str(pre), str(out), CalibrationReader({name: x}), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def test_cross_layer_equalization_keeps_float_outputs_and_equalizes_ranges(ds_pre: Path, ds_cnn) -> None:
    import onnx
    from onnx import numpy_helper

    from converters.onnx_transforms import _pairs, equalize_cross_layer
    from converters.quant_math import channel_ranges

    m = onnx.load(str(ds_pre))
    pairs = [(a.node.name, b.node.name) for a, b in _pairs(m.graph)]
    groups = {n.name: next((x.i for x in n.attribute if x.name == "group"), 1) for n in m.graph.node}
    # depthwise -> pointwise, conv -> depthwise, and the last pointwise through the global pool into the Gemm
    assert any(groups.get(a, 1) > 1 and groups.get(b, 1) == 1 for a, b in pairs)
    assert any(b.startswith("gemm") for _, b in pairs)
    assert equalize_cross_layer(m) == len(pairs) >= 4
    x = np.load(ds_cnn["eval"])["x"][:64]
    before, after = _run(ds_pre, x), _run(m.SerializeToString(), x)
    assert np.allclose(before, after, rtol=1e-4, atol=1e-6)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    (a, b), *_ = [(a, b) for a, b in _pairs(m.graph) if a.node.op_type == "Conv" and b.node.op_type == "Conv"]
    ra, rb = channel_ranges(inits[a.weight], a.out_axis), channel_ranges(inits[b.weight], b.in_axis)
    assert np.allclose(ra, rb, rtol=1e-3)
    orig = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(ds_pre)).graph.initializer}
    assert not np.allclose(orig[a.weight], inits[a.weight])  # it did change the weights


@pytest.mark.parametrize("per_channel", [False, True])
def test_bias_correction_reduces_the_output_error_on_held_out_data(ds_pre: Path, ds_cnn, tmp_path: Path, per_channel: bool) -> None:
    import onnx

    from converters.onnx_transforms import correct_bias, dequantize_head

    calib = np.load(ds_cnn["calib"])["x"]
    held_out = np.load(ds_cnn["eval"])["x"][:200]
    plain = onnx.load(str(_quantize(ds_pre, tmp_path / "q.onnx", calib, per_channel=per_channel)))
    dequantize_head(plain)  # both with float logits: the requantized probabilities would dominate the error
    m = onnx.ModelProto()
    m.CopyFrom(plain)
    report = correct_bias(ds_pre, m, {m.graph.input[0].name: calib}, tmp_path / "bc")
    assert len(report.layers) == 6 and report.samples == 128 and not report.skipped  # 5 Conv + the Gemm; the default sample cap
    ref = _run(ds_pre, held_out)
    err_plain = float(((_run(plain.SerializeToString(), held_out) - ref) ** 2).sum(1).mean())
    err_corrected = float(((_run(m.SerializeToString(), held_out) - ref) ** 2).sum(1).mean())
    assert err_corrected < 0.8 * err_plain, (err_plain, err_corrected)


def test_float_logits_remove_the_head_requantization_and_fuse_as_qgemm(ds_pre: Path, ds_cnn, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    from converters.onnx_transforms import dequantize_head

    qdq = _quantize(ds_pre, tmp_path / "q.onnx", np.load(ds_cnn["calib"])["x"], per_channel=True)
    m = onnx.load(str(qdq))
    assert len(dequantize_head(m)) == 2  # after the Gemm and after the Softmax
    producer = {o: n.op_type for n in m.graph.node for o in n.output}
    assert producer[m.graph.output[0].name] == "Softmax"
    head = tmp_path / "head.onnx"
    onnx.save(m, str(head))
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(head), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "QGemm" in ops and "Gemm" not in ops and "QLinearSoftmax" not in ops and ops[-1] == "Softmax"
    x = np.load(ds_cnn["eval"])["x"][:100]
    y = _run(head, x)
    assert np.allclose(y.sum(1), 1, atol=1e-5) and len(np.unique(y.round(6), axis=0)) > 90  # no 1/255 probability steps


def _source(ds_cnn, tmp_path: Path):
    from converters.source import load_source

    work = tmp_path / "work"
    work.mkdir()
    return load_source(ds_cnn["model"], work)


def _weighted_float_nodes(path: Path) -> list[str]:
    """Conv/Gemm/MatMul nodes whose weights are a float initializer (not dequantized int8)."""
    import onnx

    g = onnx.load(str(path)).graph
    floats = {i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT}
    return [n.name for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in floats]


@pytest.mark.parametrize("k", [1, 2])
def test_per_channel_keep_k_leaves_exactly_k_nodes_in_float(ds_cnn, tmp_path: Path, k: int) -> None:
    from converters.onnx import ONNXConverter
    from edgekit.profiles import find_profile as load_profile

    conv = ONNXConverter()
    prof = load_profile("x86-64-avx512-server")
    recipe = next(r for r in conv.recipes(prof, 64, 64) if r.name == f"qdq-minmax-per-channel-keep{k}")
    assert recipe.per_channel and recipe.options.keep_sensitive == k
    src = _source(ds_cnn, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    path = conv.convert(src, prof, recipe, src_feeds(src, ds_cnn), out)
    kept = _weighted_float_nodes(path)
    assert len(kept) == k
    plain = tmp_path / "plain"
    plain.mkdir()
    first = conv.recipes(prof, 64, 64)[0]
    assert _weighted_float_nodes(conv.convert(src, prof, first, src_feeds(src, ds_cnn), plain)) == []


def src_feeds(src, ds_cnn) -> dict[str, np.ndarray]:
    (name,) = src.input_names
    return {name: np.load(ds_cnn["calib"])["x"][:64]}


def test_recipes_follow_the_execution_provider() -> None:
    from converters.onnx import ONNXConverter
    from edgekit.profiles import find_profile as load_profile

    conv = ONNXConverter()

    def names(profile: str) -> list[str]:
        return [r.name for r in conv.recipes(load_profile(profile), 100, 100)]

    def recipes(profile: str) -> list[Recipe]:
        return conv.recipes(load_profile(profile), 100, 100)

    cpu = names("x86-64-avx512-server")
    assert cpu[:2] == ["qdq-minmax-per-channel-bc", "qdq-minmax-per-channel"] and {f"qdq-minmax-per-channel-keep{k}" for k in (1, 2, 3)} <= set(cpu)
    assert {"qdq-minmax-per-channel-bc", "qdq-minmax-per-channel-cle-bc"} <= set(cpu)
    # NNAPI is a full-integer accelerator: no float islands, logits stay quantized
    assert not any("keep" in n for n in names("pixel-8"))
    assert all(not r.options.float_output for r in recipes("pixel-8"))
    assert all(r.options.float_output for r in recipes("raspberry-pi-5"))
    # Core ML takes no quantized node: the int8 graph runs on the CPU EP, no float islands for Core ML to claim
    assert not any("keep" in n for n in names("iphone-15-pro"))
    # XNNPACK with uint8 activations takes only per-tensor uint8 weights (qu8)
    from converters.onnx_layout import ep_layout

    pi = load_profile("raspberry-pi-5")
    assert ep_layout(pi).per_channel and ep_layout(pi).weight_type == "int8"
    pi_u8 = pi.model_copy(update={"formats": pi.formats.model_copy(update={"onnx": pi.formats.onnx.model_copy(update={"activation_dtype": "uint8"})})})
    lay = ep_layout(pi_u8)
    assert lay.ep == "XnnpackExecutionProvider" and not lay.per_channel and lay.weight_type == "uint8"


def _zero_points(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    inits = {i.name: i for i in g.initializer}
    out = {}
    for n in g.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits:
            out[n.input[0]] = numpy_helper.to_array(inits[n.input[2]])
    return out


def _executed_ops(path: Path, tmp_path: Path, replay: bool = True) -> list[str]:
    """Op types ONNX Runtime's CPU EP ran, from session profiling (with or without replaying an .ort file's saved optimizations)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "prof")
    so.log_severity_level = 3
    if path.suffix == ".ort" and replay:
        so.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    s.run(None, {s.get_inputs()[0].name: np.zeros(s.get_inputs()[0].shape, np.float32)})
    events = json.loads(Path(s.end_profiling()).read_text())
    return [e["args"]["op_name"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


@pytest.fixture(scope="session")
def ds_a() -> dict[str, Path]:
    return _ds_cnn("ds-a")


@pytest.mark.parametrize("profile", ["x86-64-avx512-server", "raspberry-pi-5", "pixel-8", "iphone-15-pro", "jetson-orin-nano"])
def test_layout_per_execution_provider(ds_a, tmp_path: Path, profile: str) -> None:
    import onnx

    from converters.onnx import ONNXConverter
    from converters.onnx_layout import ep_layout
    from edgekit.profiles import find_profile as load_profile

    ds_cnn = ds_a  # the structure is checked on one variant
    conv, prof = ONNXConverter(), load_profile(profile)
    lay = ep_layout(prof)
    src = _source(ds_cnn, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    recipe = conv.recipes(prof, 64, 64)[0]
    path = conv.convert(src, prof, recipe, src_feeds(src, ds_cnn), out)
    qdq = out / "model.onnx"
    g = onnx.load(str(qdq)).graph
    producer = {o: n.op_type for n in g.node for o in n.output}
    zps = _zero_points(qdq)
    act = prof.formats.onnx.activation_dtype
    assert zps and all(z.dtype == np.dtype(act) for z in zps.values())
    if lay.activation_symmetric:  # TensorRT: int8 Q/DQ with zero point 0
        assert lay.ep == "TensorrtExecutionProvider" and all(int(z) == 0 for z in zps.values())
    # full-integer EPs keep the logits quantized; the others take them as float from the accumulator
    assert (producer[g.output[0].name] == "DequantizeLinear") == (not lay.float_output)
    ops = _executed_ops(path, tmp_path)
    if path.suffix == ".ort":
        assert path.read_bytes()[4:8] == b"ORTM"
    # on this host the CPU EP runs every Conv as a fused int8 kernel, whichever layout the file has
    assert ops.count("QLinearConv") == 5 and "Conv" not in ops, ops
    if path.suffix == ".ort":
        # Fixed style stores the fused int8 kernels; Runtime style keeps the QDQ groups for the EP to claim (the CPU EP
        # fuses them only by replaying the saved optimizations)
        stored = _executed_ops(path, tmp_path, replay=False)
        assert ("QLinearConv" in stored) == (lay.ort_style == "fixed") == ("Conv" not in stored), stored
        assert (lay.ort_style == "fixed") == (lay.ep == "CPUExecutionProvider")


@pytest.fixture(scope="session")
def relu6_residual() -> dict[str, Path]:
    """A MobileNetV2-style block (conv-BN-ReLU6, depthwise, pointwise, residual add, GAP, dense) with random weights (cached)."""
    d = CACHE / "relu6-residual"
    files = {"model": d / "model.keras", "calib": d / "calib.npz"}
    if all(p.exists() for p in files.values()):
        return files
    import keras

    keras.utils.set_random_seed(0)
    L = keras.layers
    x = keras.Input((16, 16, 3))
    h = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False)(x)))
    y = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", use_bias=False)(h)))
    y = L.BatchNormalization()(L.Conv2D(8, 1, use_bias=False)(y))
    out = L.Dense(4, activation="softmax")(L.GlobalAveragePooling2D()(L.Add()([h, y])))
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    keras.Model(x, out).save(tmp / "model.keras")
    np.savez(tmp / "calib.npz", x=np.random.default_rng(0).uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32))
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    return files


def test_runtime_style_ort_falls_back_to_prefused_groups_when_its_record_cannot_replay(relu6_residual, tmp_path: Path) -> None:
    """ORT 1.32 saves a Runtime-style record it cannot replay for this block ('Not enough produced nodes'); unreplayed,
    every QDQ group would run in float, so the converter stores the groups fused."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    from converters.onnx import ONNXConverter, _replays
    from converters.source import load_source
    from edgekit.profiles import find_profile

    conv, prof = ONNXConverter(), find_profile("pixel-8")
    work = tmp_path / "work"
    work.mkdir()
    src = load_source(relu6_residual["model"], work)
    (name,) = src.input_names
    out = tmp_path / "out"
    out.mkdir()
    path = conv.convert(src, prof, conv.recipes(prof, 16, 16)[0], {name: np.load(relu6_residual["calib"])["x"]}, out)
    # the plain Runtime-style conversion of the same QDQ file is the one that cannot replay (the reason for the fallback)
    plain = tmp_path / "plain"
    convert_onnx_models_to_ort(out / "model.onnx", output_dir=plain, optimization_styles=[OptimizationStyle.Runtime], target_platform="arm")
    assert not _replays(next(plain.glob("*.ort")))
    assert _replays(path)
    ops = _executed_ops(path, tmp_path)
    assert ops.count("QLinearConv") == 3 and "Conv" not in ops and "QLinearAdd" in ops, ops


def test_recipes_on_the_same_calibration_share_its_ranges_and_build_the_same_files(ds_cnn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime's calibration cache: per-tensor/per-channel/bias-corrected recipes on one graph calibrate once, byte-identical files."""
    import hashlib

    from converters import onnx as onnx_conv
    from edgekit.profiles import find_profile as load_profile

    conv = onnx_conv.ONNXConverter()
    prof = load_profile("x86-64-avx512-server")
    names = ("qdq-minmax-per-channel", "qdq-minmax-per-tensor", "qdq-minmax-per-channel-bc", "qdq-minmax-per-channel-cle-bc")
    recipes = [r for r in conv.recipes(prof, 64, 64) if r.name in names]
    assert len(recipes) == len(names)
    src = _source(ds_cnn, tmp_path)
    feeds = src_feeds(src, ds_cnn)

    def build(tag: str) -> list[str]:
        out = []
        for r in recipes:
            d = tmp_path / f"{tag}-{r.name}"
            d.mkdir()
            out.append(hashlib.sha256(conv.convert(src, prof, r, feeds, d).read_bytes()).hexdigest())
        return out

    shared = build("shared")
    caches = sorted((src.workdir / "onnx" / "calibration").glob("*.json"))
    assert len(caches) == 2  # the graph and its cross-layer-equalized version, one calibration each
    fresh_dir = iter(range(100))
    monkeypatch.setattr(onnx_conv, "calibration_cache_path", lambda *a, **k: tmp_path / "fresh" / f"{next(fresh_dir)}.json")
    assert build("fresh") == shared


def test_mse_range_has_the_least_quantization_error_of_the_candidates() -> None:
    """Checked against real fake-quantization of the samples: the range chosen on the histogram beats MinMax on an
    exponential tail (ACIQ's analysis puts the 8-bit optimum well inside the extremes of such a tail), keeps the full
    range on a uniform distribution, and no other shrink factor does better by more than the histogram's approximation."""
    from converters.quant_math import MSE_SHRINK_STEPS, fake_quant_activation, mse_range

    rng = np.random.default_rng(0)

    def err(x, lo, hi):
        return float(np.mean((x - fake_quant_activation(x, lo, hi)) ** 2))

    tail = rng.exponential(1.0, 200_000).astype(np.float32)  # a ReLU-like one-sided tail
    uniform = rng.uniform(-1, 1, 200_000).astype(np.float32)
    for x, clipped in ((tail, True), (uniform, False)):
        m = float(np.abs(x).max())
        hist, edges = np.histogram(x, 2048, range=(-m, m))
        lo, hi = mse_range(hist, edges, float(x.min()), float(x.max()))
        assert lo <= 0 <= hi
        if clipped:
            assert lo == 0.0 and hi < 0.95 * x.max() and err(x, lo, hi) < 0.95 * err(x, float(x.min()), float(x.max()))
        else:
            assert hi == pytest.approx(x.max()) and lo == pytest.approx(x.min())
        grid = [err(x, s * float(x.min()), s * float(x.max())) for s in np.linspace(1.0, 0.05, MSE_SHRINK_STEPS)]
        assert err(x, lo, hi) <= 1.05 * min(grid)
    a, b = mse_range(*np.histogram(uniform, 2048), -1.0, 0.5, symmetric=True)
    assert a == -b  # int8 symmetric activations: one magnitude


def test_mse_recipe_quantizes_with_its_own_ranges(ds_cnn, tmp_path: Path) -> None:
    """The MSE ranges reach the QDQ graph: its activation scales are the cache's ranges / 255, and some are tighter than MinMax's."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.calibrate import load_tensors_data

    from converters.onnx import ONNXConverter
    from edgekit.profiles import find_profile as load_profile

    conv = ONNXConverter()
    prof = load_profile("x86-64-avx512-server")  # uint8 activations, asymmetric
    by = {r.name: r for r in conv.recipes(prof, 64, 64)}
    src = _source(ds_cnn, tmp_path)
    feeds = src_feeds(src, ds_cnn)
    scales, new_caches, seen = {}, {}, set()
    for name in ("qdq-minmax-per-channel-bc", "qdq-mse-per-channel-bc"):
        d = tmp_path / name
        d.mkdir()
        g = onnx.load(str(conv.convert(src, prof, by[name], feeds, d))).graph
        inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        scales[name] = {n.input[0]: float(inits[n.input[1]]) for n in g.node if n.op_type == "QuantizeLinear" and inits[n.input[1]].ndim == 0}
        now = set((src.workdir / "onnx" / "calibration").glob("*.json"))
        (new_caches[name],) = now - seen  # each recipe's own calibration
        seen = now
    mse = load_tensors_data(new_caches["qdq-mse-per-channel-bc"])
    mse_scale = scales["qdq-mse-per-channel-bc"]
    for t, s in mse_scale.items():
        lo, hi = (float(v) for v in mse[t].range_value)
        assert s == pytest.approx((max(hi, 0) - min(lo, 0)) / 255, rel=1e-5)
    shared = set(mse_scale) & set(scales["qdq-minmax-per-channel-bc"])
    tighter = [t for t in shared if mse_scale[t] < 0.99 * scales["qdq-minmax-per-channel-bc"][t]]
    assert shared and tighter and all(mse_scale[t] <= scales["qdq-minmax-per-channel-bc"][t] * 1.0001 for t in shared)
