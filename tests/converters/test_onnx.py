"""The ONNX converter on real models: QDQ INT8, ORT format, EP placement, ONNX sources, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converters.pipeline import ConvertOptions, run_convert
from edgekit import runtime
from edgekit.bundle import open_bundle, verify_bundle


@pytest.fixture(scope="session")
def digits_onnx(digits, tmp_path_factory) -> Path:
    """The digits model exported to a float ONNX file (static batch 1)."""
    from converters.onnx import export_float_onnx
    from converters.source import load_source

    work = tmp_path_factory.mktemp("onnx-src")
    src = load_source(digits["model"], work)
    return export_float_onnx(src, 17, work)


@pytest.fixture(scope="session")
def onnx_run(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-bundles")
    opts = ConvertOptions(model=digits["model"], profiles=("pixel-8", "raspberry-pi-5"), formats=("onnx",), calibration=digits["calib"],
                          eval=digits["eval"], out=out, name="digits", latency_runs=5)
    return run_convert(opts)


def test_ort_format_bundle_with_reduced_operator_config(onnx_run) -> None:
    pixel = next(r for r in onnx_run.results if r.profile == "pixel-8")
    b = open_bundle(pixel.bundle_dir)
    assert b.manifest.file == "digits.ort" and b.model_path.read_bytes()[4:8] == b"ORTM"
    (extra,) = b.manifest.extra_files
    assert extra.file == "required_operators.config"
    config = (pixel.bundle_dir / extra.file).read_text()
    assert "ai.onnx" in config and "QuantizeLinear" in config
    assert verify_bundle(pixel.bundle_dir).ok


def test_profile_without_ort_format_gets_plain_qdq_onnx(onnx_run) -> None:
    import onnx

    pi = next(r for r in onnx_run.results if r.profile == "raspberry-pi-5")
    b = open_bundle(pi.bundle_dir)
    assert b.manifest.file == "digits.onnx" and b.manifest.extra_files == ()
    ops = {n.op_type for n in onnx.load(str(b.model_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


def test_activation_dtype_follows_the_profile(onnx_run) -> None:
    import onnx

    for r in onnx_run.results:
        want = "uint8" if r.profile == "pixel-8" else "int8"
        assert r.manifest.quantization.activations == want
        work_model = open_bundle(r.bundle_dir).model_path
        if work_model.suffix == ".onnx":
            g = onnx.load(str(work_model)).graph
            zps = [i for i in g.initializer if i.name.endswith("zero_point") and not i.name.endswith("_quantized_zero_point")]  # not int32 biases
            assert zps and all(onnx.helper.tensor_dtype_to_np_dtype(z.data_type).name == want for z in zps)


def test_accuracy_and_golden_reproduce_on_onnx_runtime(onnx_run) -> None:
    for r in onnx_run.results:
        m = r.manifest.metrics
        assert m["int8_accuracy"].status == "measured" and m["accuracy_drop"].value <= 1.0
        model = runtime.load(r.bundle_dir)
        assert model.runtime == "onnxruntime"
        g = open_bundle(r.bundle_dir).golden()
        assert np.abs(model.predict(g["x"]) - g["y_host"]).max() <= 1e-5


def test_execution_provider_placement(onnx_run) -> None:
    pixel = next(r for r in onnx_run.results if r.profile == "pixel-8")
    assert pixel.coverage.target == "nnapi_ep" and pixel.coverage.total_ops > 0
    assert {p.op for p in pixel.coverage.ops} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}


def test_unquantizable_ops_are_reported(onnx_run) -> None:
    r = onnx_run.results[0]
    assert any("Softmax" in w and "no int8 rule" in w for w in r.warnings)
    assert any("Softmax" in v for v in r.manifest.verification)


def test_recipe_search_reports_every_attempt(digits, tmp_path: Path) -> None:
    opts = ConvertOptions(model=digits["model"], profiles=("raspberry-pi-5",), formats=("onnx",), calibration=digits["calib"],
                          eval=digits["eval"], out=tmp_path, max_accuracy_drop=-1.0, allow_over_budget=True, latency_runs=3)
    (r,) = run_convert(opts).results
    names = [a.recipe for a in r.attempts]
    assert names == ["qdq-minmax-per-channel-bc", "qdq-minmax-per-channel", "qdq-minmax-per-channel-cle-bc", "qdq-minmax-per-tensor",
                     "qdq-minmax-per-tensor-cle-bc", "qdq-percentile-per-channel-bc", "qdq-mse-per-channel-bc", "qdq-entropy-per-channel",
                     "qdq-minmax-per-channel-keep1", "qdq-minmax-per-channel-keep2", "qdq-minmax-per-channel-keep3"]
    assert all(a.error is None and a.agreement is not None for a in r.attempts)
    assert sum(a.chosen for a in r.attempts) == 1


def test_onnx_source(digits_onnx: Path, digits, tmp_path: Path) -> None:
    opts = ConvertOptions(model=digits_onnx, profiles=("x86-64-avx512-server",), formats=("onnx",), calibration=digits["calib"],
                          eval=digits["eval"], out=tmp_path, name="fromonnx", latency_runs=3)
    (r,) = run_convert(opts).results
    assert r.manifest.provenance.source == digits_onnx.name
    assert r.manifest.metrics["agreement"].value >= 95


def test_onnx_source_with_format_all_builds_onnx_only(digits_onnx: Path, digits, tmp_path: Path) -> None:
    opts = ConvertOptions(model=digits_onnx, profiles=("pixel-8",), calibration=digits["calib"], out=tmp_path, latency_runs=3)
    assert [r.format for r in run_convert(opts).results] == ["onnx"]


def _dynamic(src: Path, dst: Path) -> Path:
    import onnx

    m = onnx.load(str(src))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for d, name in zip(dims, ("batch", "h", "w")):
        d.dim_param = name
    onnx.save(m, str(dst))
    return dst


def test_dynamic_shape_needs_input_shape(digits_onnx: Path, digits, tmp_path: Path, run_cli) -> None:
    dyn = _dynamic(digits_onnx, tmp_path / "dyn.onnx")
    out = tmp_path / "out"
    code, _, err = run_cli("convert", dyn, "--profile", "pixel-8", "--calibration", digits["calib"], "--out", out)
    assert code == 4 and "dynamic dimensions" in err and "--input-shape" in err and "Traceback" not in err
    assert not out.exists()  # a failed run does not even create --out
    code, out_json, err = run_cli("convert", dyn, "--profile", "pixel-8", "--calibration", digits["calib"], "--out", out,
                                  "--input-shape", "1,8,8,1", "--latency-runs", "3", "--json")
    assert code == 0, err
    assert json.loads(out_json)["results"][0]["format"] == "onnx"


def test_onnx_that_fails_the_checker(tmp_path: Path, digits, run_cli) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage-not-a-protobuf" * 10)
    out = tmp_path / "out"
    code, _, err = run_cli("convert", bad, "--profile", "pixel-8", "--calibration", digits["calib"], "--out", out)
    assert code == 3 and "not a valid ONNX model" in err and "Hint:" in err and "Traceback" not in err
    assert not out.exists()


def test_tflite_from_onnx_source_is_refused(digits_onnx: Path, digits, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli("convert", digits_onnx, "--profile", "pixel-8", "--format", "tflite", "--calibration", digits["calib"], "--out", out)
    assert code == 4 and "built from Keras or SavedModel sources" in err


def test_profile_without_onnx(digits, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli("convert", digits["model"], "--profile", "coral-edgetpu", "--format", "onnx", "--calibration", digits["calib"], "--out", out)
    assert code == 4 and "does not take onnx" in err and not out.exists() or list(out.iterdir()) == []


def test_embedded_preprocessing_takes_raw_pixels(digits, tmp_path: Path) -> None:
    from edgekit.manifest import Preprocessing

    pre = Preprocessing(layout="NHWC", scale=1 / 16, raw_dtype="uint8")  # digits are 0..16 counts
    opts = ConvertOptions(model=digits["model"], profiles=("pixel-8",), formats=("onnx",), calibration=digits["calib"], eval=digits["eval"],
                          out=tmp_path, latency_runs=3, preprocessing=pre, embed_preprocessing=True)
    (r,) = run_convert(opts).results
    assert r.manifest.preprocessing.embedded and r.manifest.inputs[0].dtype == "uint8"
    model = runtime.load(r.bundle_dir)
    x = np.load(digits["eval"])["x"][:50]
    raw = np.rint(x * 16).astype(np.uint8)
    assert np.array_equal(model.predict_raw(raw), model.predict(x))
    assert r.manifest.metrics["agreement"].value >= 95


def test_runtime_applies_preprocessing_for_every_format(digits, tmp_path: Path) -> None:
    from edgekit.manifest import Preprocessing

    pre = Preprocessing(layout="NHWC", scale=1 / 16, raw_dtype="uint8")
    opts = ConvertOptions(model=digits["model"], profiles=("raspberry-pi-5",), formats=("tflite", "onnx"), calibration=digits["calib"],
                          out=tmp_path, latency_runs=3, preprocessing=pre)
    x = np.load(digits["eval"])["x"][:20]
    raw = np.rint(x * 16).astype(np.uint8)
    for r in run_convert(opts).results:
        model = runtime.load(r.bundle_dir)
        assert not r.manifest.preprocessing.embedded
        assert np.allclose(model.predict_raw(raw), model.predict(x)), r.format


def test_embed_without_a_spec_is_a_usage_error(digits, tmp_path: Path, run_cli) -> None:
    code, _, err = run_cli("convert", digits["model"], "--profile", "pixel-8", "--calibration", digits["calib"], "--out", tmp_path / "o",
                           "--embed-preprocessing")
    assert code == 2 and "needs a --preprocessing spec" in err


def test_sensitivity_ranking_names_real_float_nodes(digits_onnx: Path, digits, tmp_path: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from converters.onnx import sensitive_nodes
    from converters.onnx_calibration import CalibrationReader

    x = np.load(digits["calib"])["x"][:32]
    qdq = tmp_path / "q.onnx"
    name = onnx.load(str(digits_onnx)).graph.input[0].name
    quantize_static(str(digits_onnx), str(qdq), CalibrationReader({name: x}), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    ranked = sensitive_nodes(digits_onnx, qdq, {name: x}, tmp_path)
    names = {n.name for n in onnx.load(str(digits_onnx)).graph.node}
    assert ranked and set(ranked) <= names and len(ranked) == len(set(ranked))


def test_compact_names_keep_io_and_numerics(digits_onnx: Path, digits, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    g = onnx.load(str(digits_onnx)).graph
    assert all(len(n.name) < 20 for n in g.node) and g.input[0].name == "input_layer"  # the Keras input's own name
    x = np.load(digits["eval"])["x"][:1]
    ort.InferenceSession(str(digits_onnx)).run(None, {"input_layer": x})
