"""bench/quantization_peers.py's own parts on a tiny ONNX model built here (no TensorFlow, a few seconds):
the paired accuracy-drop interval, the activation-dtype reading of real quantized files, one peer run as
its own process, the "not installed" reasons and the docs section it rewrites. No timing is checked."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from bench import peers_report
from bench import quantization_peers as qp


def _tiny_onnx(path: Path) -> Path:
    """Conv -> Relu -> MaxPool -> Flatten -> Gemm, 1x1x8x8 input named 'input', seeded weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, 0.5, (36, 3)).astype(np.float32), "fw"),
             numpy_helper.from_array(np.zeros(3, np.float32), "fb")]
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["out"], name="fc")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture()
def tiny(tmp_path: Path) -> dict[str, Path]:
    x = np.random.default_rng(1).uniform(0, 1, (16, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return {"float": _tiny_onnx(tmp_path / "float.onnx"), "calib": tmp_path / "calib.npz", "x": x}


def test_paired_drop_counts_changed_images_and_never_collapses_to_zero_width() -> None:
    y = np.zeros(100, np.int64)
    fl = np.zeros(100, np.int64)
    q = fl.copy()
    q[:3] = 1  # three images the int8 model gets wrong that the float model got right
    fl[50] = 1  # and one the other way round
    drop, lo, hi = qp.paired_drop(y, fl, q)
    assert drop == pytest.approx(2.0)
    assert lo < drop < hi
    same, lo0, hi0 = qp.paired_drop(y, fl, fl)
    assert same == 0.0 and lo0 < 0.0 < hi0 and lo0 == pytest.approx(-hi0)


def test_activation_dtypes_read_from_real_quantized_files(tiny: dict[str, Path], tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from bench.peers_worker import _Reader

    assert qp.acts_label(qp.activation_dtypes(tiny["float"])) == ("float32 2", False)
    full, mixed = tmp_path / "full.onnx", tmp_path / "mixed.onnx"
    for out, exclude in ((full, []), (mixed, ["fc"])):
        quantize_static(str(tiny["float"]), str(out), _Reader("input", tiny["x"]), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, nodes_to_exclude=exclude)
    counts = qp.activation_dtypes(full)
    assert counts == {"uint8": 2}  # the Gemm's input comes through MaxPool/Flatten from a DequantizeLinear
    assert qp.acts_label(counts) == ("uint8", True)
    label, int8 = qp.acts_label(qp.activation_dtypes(mixed))
    assert not int8 and "float32 1" in label


def test_a_peer_runs_as_its_own_process_and_is_scored_by_the_common_evaluator(tiny: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(qp.SIDES, "ort-plain", ("onnx", None, "plain ORT quantize_static"))  # the project's own Python
    res = qp.run_peer("ort-plain", tiny["float"], tiny["calib"], tmp_path / "int8.onnx", {})
    assert res["status"] == "ok", res
    assert res["wall_s"] > 0 and res["quantize_s"] >= 0 and "onnxruntime" in res["versions"]
    assert qp.acts_label(qp.activation_dtypes(res["model"]))[1]
    pred_f, pred_q = qp.predict(tiny["float"], tiny["x"]), qp.predict(res["model"], tiny["x"])
    assert pred_f.shape == pred_q.shape == (16,)
    lat = qp.latency({"float": tiny["float"], "int8": res["model"]}, tiny["x"][:1], rounds=1)
    assert set(lat) == {"float", "int8"} and all(v > 0 for v in lat.values())


def test_a_missing_or_failed_peer_venv_is_reported_with_the_reason(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(qp, "PEERS_CACHE", tmp_path)
    py, why = qp.peer_python("nncf")
    assert py is None and why.startswith("not installed") and "scripts/peers-venv.sh nncf" in why
    (tmp_path / "aimet.failed").write_text("Collecting aimet-onnx\nERROR: No matching distribution found for aimet-onnx==2.42.0\n")
    py, why = qp.peer_python("aimet")
    assert py is None and "No matching distribution" in why
    res = qp.run_peer("aimet", tmp_path / "f.onnx", tmp_path / "c.npz", tmp_path / "int8.onnx", {})
    assert res["status"].startswith("not installed")
    assert qp.peer_python("ort-plain") == (Path(sys.executable), None)


def test_the_docs_section_is_replaced_between_its_markers_only(tmp_path: Path, monkeypatch) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nbefore\n")
    monkeypatch.setattr(peers_report, "DOC", doc)
    peers_report.write_doc(f"{peers_report.BEGIN}\nfirst\n{peers_report.END}\n")
    doc.write_text(doc.read_text() + "\n## Later section\nafter\n")
    peers_report.write_doc(f"{peers_report.BEGIN}\nsecond\n{peers_report.END}\n")
    text = doc.read_text()
    assert "first" not in text and text.count(peers_report.BEGIN) == 1 and "second" in text
    assert text.index("before") < text.index("second") < text.index("after")


def test_the_wall_goal_compares_edgekit_from_each_input_with_the_fastest_peer_within_budget() -> None:
    def row(side: str, drop: float, wall: float) -> dict:
        return {"side": side, "format": "onnx", "status": "ok", "drop_pt": drop, "wall_s": wall, "acts": "uint8", "acts_int8": True}

    rows = [row("edgekit", 0.1, 12.0), row("edgekit-onnx", 0.1, 3.0), row("ort-plain", 0.0, 2.0), row("nncf", 0.2, 1.0),
            row("aimet", 1.4, 0.5)]  # aimet is faster but over the budget: not the reference
    ratios = {r.name: r for r in peers_report.goal_ratios([{"model": "mnist_cnn", "accuracy": True, "rows": rows}])}
    keras = next(r for n, r in ratios.items() if "from .keras" in n)
    same = next(r for n, r in ratios.items() if "from the peers' float .onnx" in n)
    assert keras.value == pytest.approx(12.0) and same.value == pytest.approx(3.0)
    assert "nncf" in keras.note and keras.goal == peers_report.GOAL_WALL_RATIO


def test_tflite_wall_goal_also_against_the_fastest_peer_that_starts_from_the_same_keras() -> None:
    """aiq starts from a float .tflite edgekit cannot take; aiq-keras (export + aiq) and litert-plain start from the .keras."""
    def row(side: str, drop: float, wall: float) -> dict:
        return {"side": side, "format": "tflite", "status": "ok", "drop_pt": drop, "wall_s": wall, "acts": "int8", "acts_int8": True}

    rows = [row("edgekit", 0.1, 12.0), row("aiq", 0.0, 2.0), row("aiq-keras", 0.0, 6.0), row("litert-plain", 0.2, 8.0)]
    ratios = {r.name: r for r in peers_report.goal_ratios([{"model": "mnist_cnn", "accuracy": True, "rows": rows}])}
    any_input = next(r for n, r in ratios.items() if "from .keras) / fastest peer within" in n)
    same = next(r for n, r in ratios.items() if "from the same .keras" in n)
    assert any_input.value == pytest.approx(6.0) and "aiq 2.0" in any_input.note
    assert same.value == pytest.approx(2.0) and "aiq-keras 6.0" in same.note


def test_aiq_keras_is_the_float_export_then_aiq_and_counts_both(tmp_path: Path) -> None:
    """The real two steps on a tiny Keras model: TFLiteConverter's float export (project venv), then aiq (its venv, if built)."""
    import keras

    # every name given: Keras' automatic names count per process, and later fixtures expect the first "input_layer"
    model = keras.Sequential([keras.Input((8, 8, 1), name="aiq_in"), keras.layers.Conv2D(2, 3, name="aiq_conv"),
                              keras.layers.Flatten(name="aiq_flat"), keras.layers.Dense(3, name="aiq_dense")], name="aiq_probe")
    model.save(tmp_path / "m.keras")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 1)).astype(np.float32))
    res = qp.run_aiq_from_keras(tmp_path / "m.keras", tmp_path / "c.npz", tmp_path, {})
    assert (tmp_path / "float.tflite").stat().st_size > 0 and res["export_wall_s"] > 0
    assert qp.peer_python("litert-float") == (Path(sys.executable), None)
    py, why = qp.peer_python("aiq")
    if py is None:  # CI has no peer venvs (make bench builds them): the reason, and the export still counted
        assert res["status"] == why and res["wall_s"] >= res["export_wall_s"]
    else:
        assert res["status"] == "ok", res
        assert res["wall_s"] > res["export_wall_s"] and qp.acts_label(qp.activation_dtypes(res["model"]))[1]
