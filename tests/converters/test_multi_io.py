"""Every input and output by name: two-input classifier, detector-style head, stateful cell with an int64 input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converters.pipeline import ConvertOptions, run_convert
from edgekit import runtime
from edgekit.bundle import open_bundle
from edgekit.golden import check_golden, golden_feeds, golden_outputs

PROFILES = ("raspberry-pi-5", "pixel-8")


def _convert(files: dict[str, Path], out: Path, **kw):
    return run_convert(ConvertOptions(model=files["model"], profiles=kw.pop("profiles", PROFILES), calibration=files["calib"], out=out,
                                      latency_runs=3, **kw))


@pytest.fixture(scope="module")
def detector_run(detector_model, tmp_path_factory):
    return _convert(detector_model, tmp_path_factory.mktemp("det"))


@pytest.fixture(scope="module")
def stateful_run(stateful_model, tmp_path_factory):
    return _convert(stateful_model, tmp_path_factory.mktemp("state"))


def test_two_input_classifier_feeds_each_input_by_name(two_input_model, tmp_path: Path) -> None:
    report = _convert(two_input_model, tmp_path, profiles=("raspberry-pi-5",), formats=("tflite",))
    assert report.task == "classification" and "class axis" in report.task_reason
    (r,) = report.results
    assert {s.name for s in r.manifest.inputs} == {"feat", "ctx"}
    model = runtime.load(r.bundle_dir)
    b = open_bundle(r.bundle_dir)
    feeds = golden_feeds(b.golden(), b.manifest)
    assert set(feeds) == {"feat", "ctx"}
    out = model.run(feeds)
    ref = golden_outputs(b.golden(), b.manifest)
    assert ref is not None and all(np.array_equal(out[k], ref[k]) for k in ref)  # y_host is exactly what LiteRT gives
    assert check_golden(model, b).passed
    with pytest.raises(Exception, match="predict\\(\\) takes one"):
        model.predict(feeds["feat"])


def test_detector_gets_per_output_fidelity_not_top1(detector_run) -> None:
    assert detector_run.task == "generic"
    assert {(r.profile, r.format) for r in detector_run.results} == {(p, f) for p in PROFILES for f in ("tflite", "onnx")}
    for r in detector_run.results:
        m = r.manifest
        assert len(m.outputs) == 2 and m.task == "generic"
        assert {"sqnr_db.output_0", "sqnr_db.output_1", "cosine.output_0", "max_rel_error.output_1"} <= set(m.metrics)
        assert m.metrics["min_sqnr_db"].value >= 20 and m.metrics["agreement"].value is None
        assert all(m.metrics[f"cosine.output_{i}"].value > 0.99 for i in (0, 1))
        model = runtime.load(r.bundle_dir)
        b = open_bundle(r.bundle_dir)
        g = check_golden(model, b)
        assert g.passed and g.count == 12  # 20% of the 60 calibration examples are held out for evaluation
        assert golden_outputs(b.golden(), m, "y_float") is not None  # every output has its float reference


def test_detector_is_not_a_classifier(detector_model, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli("convert", detector_model["model"], "--profile", "raspberry-pi-5", "--calibration", detector_model["calib"],
                           "--out", out, "--task", "classification")
    assert code != 0 and "single class axis" in err and "Hint:" in err and "Traceback" not in err
    assert not out.exists()


def test_stateful_cell_keeps_int64_input_unquantized(stateful_run) -> None:
    for r in stateful_run.results:
        specs = {s.name: s for s in r.manifest.inputs}
        assert set(specs) == {"audio", "state", "sr"}
        assert specs["sr"].dtype == "int64" and specs["sr"].quantization is None
        assert {s.name for s in r.manifest.outputs} == {"output_0", "output_1"}
        model = runtime.load(r.bundle_dir)
        b = open_bundle(r.bundle_dir)
        assert check_golden(model, b).passed
        feeds = golden_feeds(b.golden(), b.manifest)
        assert feeds["sr"].dtype == np.int64
        if r.format == "tflite" and specs["audio"].quantization is not None:
            assert specs["audio"].dtype == "int8"  # the float inputs are quantized, the rate is not


def test_float_and_onnx_match_by_output_name(stateful_run) -> None:
    """LiteRT orders outputs differently from the source; the signature names keep them apart."""
    by_fmt = {r.format: r for r in stateful_run.results if r.profile == "raspberry-pi-5"}
    shapes = {f: {s.name: s.shape for s in r.manifest.outputs} for f, r in by_fmt.items()}
    assert shapes["tflite"] == shapes["onnx"] == {"output_0": (1, 1), "output_1": (1, 16)}


def test_calibration_missing_one_input(stateful_model, tmp_path: Path, run_cli) -> None:
    arrays = dict(np.load(stateful_model["calib"]))
    del arrays["sr"]
    f = tmp_path / "c.npz"
    np.savez(f, **arrays)
    out = tmp_path / "out"
    code, _, err = run_cli("convert", stateful_model["model"], "--profile", "raspberry-pi-5", "--calibration", f, "--out", out)
    assert code == 3 and "no array named 'sr'" in err and "Hint:" in err and "Traceback" not in err
    assert not out.exists()


def test_wrong_dtype_for_int64_input(stateful_model, tmp_path: Path, run_cli) -> None:
    arrays = dict(np.load(stateful_model["calib"]))
    arrays["sr"] = arrays["sr"].astype(np.float32)
    f = tmp_path / "c.npz"
    np.savez(f, **arrays)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli("convert", stateful_model["model"], "--profile", "raspberry-pi-5", "--calibration", f, "--out", out)
    assert code == 3 and "'sr' has dtype float32" in err and "int64" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # an existing --out is left exactly as it was


def test_input_shape_naming_an_unknown_input(two_input_model, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli("convert", two_input_model["model"], "--profile", "raspberry-pi-5", "--calibration", two_input_model["calib"],
                           "--out", out, "--input-shape", "nope=1,8")
    assert code == 2 and "Hint:" in err and "Traceback" not in err
    assert not out.exists()


def test_report_names_the_task(detector_model, tmp_path: Path, run_cli) -> None:
    code, out_json, err = run_cli("convert", detector_model["model"], "--profile", "raspberry-pi-5", "--format", "onnx",
                                  "--calibration", detector_model["calib"], "--out", tmp_path / "o", "--latency-runs", "2", "--json",
                                  "--task", "detection", "--min-sqnr-db", "25")
    assert code == 0, err
    rep = json.loads(out_json)
    assert rep["task"] == "detection" and rep["min_sqnr_db"] == 25
    (res,) = rep["results"]
    assert res["metrics"]["min_sqnr_db"]["value"] >= 25


def test_python_api_takes_a_keras_model_object(two_input_model, tmp_path: Path) -> None:
    import keras

    import edgekit

    model = keras.models.load_model(two_input_model["model"], compile=False)
    report = edgekit.convert(model, profiles="raspberry-pi-5", formats="onnx", calibration=two_input_model["calib"], out=tmp_path / "o",
                             name="two-input", latency_runs=2)
    (r,) = report.results
    assert r.bundle_dir.name == "two-input-raspberry-pi-5-onnx" and {s.name for s in r.manifest.inputs} == {"feat", "ctx"}
    assert not any(p.name == "source_saved_model" for p in Path.cwd().iterdir())  # exports go to the run's work dir


def test_run_matches_the_raw_runtimes_exactly(stateful_run) -> None:
    """edgekit.runtime's run() against a bare LiteRT Interpreter and a bare ONNX Runtime session, same feeds."""
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    for r in (r for r in stateful_run.results if r.profile == "raspberry-pi-5"):
        b = open_bundle(r.bundle_dir)
        feeds = {k: v[:1] for k, v in golden_feeds(b.golden(), b.manifest).items()}
        ours = runtime.load(r.bundle_dir).run(feeds)
        if r.format == "tflite":
            it = Interpreter(model_path=str(b.model_path))
            it.allocate_tensors()
            (sig,) = it._get_full_signature_list().values()
            for name, idx in sig["inputs"].items():
                d = next(d for d in it.get_input_details() if d["index"] == idx)
                scale, zp = d["quantization"]
                x = feeds[name]
                if scale:
                    v = x.astype(np.float64) / scale
                    x = np.clip(np.trunc(v + np.copysign(0.5, v)) + zp, -128, 127)
                it.set_tensor(idx, x.astype(d["dtype"]))
            it.invoke()
            for name, idx in sig["outputs"].items():
                d = next(d for d in it.get_output_details() if d["index"] == idx)
                scale, zp = d["quantization"]
                raw = it.get_tensor(idx)
                expect = (raw.astype(np.float32) - np.float32(zp)) * np.float32(scale) if scale else raw
                assert np.array_equal(ours[name], expect), (r.format, name)
        else:
            s = ort.InferenceSession(str(b.model_path), providers=["CPUExecutionProvider"])
            raw = dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))
            assert all(np.array_equal(ours[k], raw[k]) for k in raw)
