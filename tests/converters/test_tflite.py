"""The TFLite converter end to end on a real model: bundles, checks, recipe search, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converters.pipeline import ConvertOptions, run_convert
from edgekit.bundle import open_bundle, verify_bundle
from edgekit.errors import AccuracyBudgetError


def test_one_bundle_per_profile_with_report(digits_bundles) -> None:
    out = digits_bundles.out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["digits-coral-edgetpu-tflite", "digits-raspberry-pi-5-tflite", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert [r["profile"] for r in report["results"]] == ["raspberry-pi-5", "coral-edgetpu"]
    assert "| raspberry-pi-5 | tflite |" in (out / "report.md").read_text()
    for r in digits_bundles.results:
        assert verify_bundle(r.bundle_dir).ok


def test_full_integer_model_with_profile_io(digits_bundles) -> None:
    from ai_edge_litert.interpreter import Interpreter

    for r in digits_bundles.results:
        b = open_bundle(r.bundle_dir)
        interp = Interpreter(model_path=str(b.model_path))
        interp.allocate_tensors()
        want = "uint8" if r.profile == "coral-edgetpu" else "int8"
        assert np.dtype(interp.get_input_details()[0]["dtype"]).name == want
        assert np.dtype(interp.get_output_details()[0]["dtype"]).name == want
        weights = [t for t in interp.get_tensor_details() if t["name"].endswith(("kernel", "MatMul")) or "conv" in t["name"].lower()]
        float_weights = [t["name"] for t in weights if np.dtype(t["dtype"]).name == "float32"]
        precision = b.manifest.quantization.precision
        if precision == "INT8":
            assert not float_weights, float_weights
        else:  # the fastest recipe here may be XNNPACK's mixed one: its float islands are named, never on a full-integer accelerator
            assert precision.endswith("(mixed)") and r.profile != "coral-edgetpu", precision
        assert r.coverage.dtype_violations == ()


def test_accuracy_and_agreement_are_measured(digits_bundles) -> None:
    assert digits_bundles.float_accuracy is not None and digits_bundles.float_accuracy > 85
    for r in digits_bundles.results:
        m = r.manifest.metrics
        assert m["int8_accuracy"].status == "measured"
        assert abs(m["accuracy_drop"].value - (m["float_accuracy"].value - m["int8_accuracy"].value)) < 1e-9
        assert m["accuracy_drop"].value <= 1.0 and m["agreement"].value >= 95
        assert 0 < m["size_ratio"].value < 0.5
        assert m["host_latency_ms_p50"].value > 0 and m["float_host_latency_ms_p50"].value > 0
        # one candidate is kept and it is within budget; recipes after it may still be tried (the best is slower than float)
        (chosen,) = [a for a in r.attempts if a.chosen]
        assert chosen.within_budget


def test_ops_are_checked_against_the_profile(digits_bundles) -> None:
    coral = next(r for r in digits_bundles.results if r.profile == "coral-edgetpu")
    assert coral.coverage.target == "edgetpu"
    ops = {p.op for p in coral.coverage.ops}
    assert {"CONV_2D", "FULLY_CONNECTED"} <= ops
    assert coral.coverage.total_ops == sum(p.count for p in coral.coverage.ops)
    pi = next(r for r in digits_bundles.results if r.profile == "raspberry-pi-5")
    assert pi.coverage.target == "xnnpack"
    # XNNPACK has no int8 SOFTMAX kernel in LiteRT 2.3: it runs on the builtin CPU kernels.
    assert pi.coverage.fallbacks == ("SOFTMAX",) and pi.coverage.ops_on_target == pi.coverage.total_ops - 1
    assert next(p for p in pi.coverage.ops if p.op == "SOFTMAX").placement == "cpu"


def test_saved_model_source(digits, tmp_path: Path) -> None:
    unlabeled = tmp_path / "x_only.npz"
    np.savez(unlabeled, x=np.load(digits["calib"])["x"])
    out = tmp_path / "out"
    opts = ConvertOptions(model=digits["saved_model"], profiles=("x86-64-avx512-server",), formats=("tflite",),
                          calibration=unlabeled, out=out, latency_runs=5)
    report = run_convert(opts)
    (r,) = report.results
    assert r.manifest.name == "saved_model" and report.float_accuracy is None  # no --eval: held-out agreement only
    assert r.manifest.metrics["accuracy_drop"].note.startswith("disagreement")
    assert r.manifest.metrics["agreement"].value >= 95


def test_budget_miss_tries_every_recipe_then_fails_with_the_attempts(digits, tmp_path: Path) -> None:
    opts = ConvertOptions(model=digits["model"], profiles=("x86-64-avx512-server",), formats=("tflite",), calibration=digits["calib"],
                          eval=digits["eval"], out=tmp_path, max_accuracy_drop=-1.0, latency_runs=5)
    with pytest.raises(AccuracyBudgetError) as e:
        run_convert(opts)
    for recipe in ("int8-per-channel", "int8-cle", "int8-bias-corrected", "int8-per-tensor", "int8-legacy-calibrator"):
        assert recipe in e.value.message
    assert "int16x8" not in e.value.message  # the profile's XNNPACK has no 16x8 kernels (int16x8_kernels: false)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_allow_over_budget_keeps_the_best_attempt(digits, tmp_path: Path) -> None:
    opts = ConvertOptions(model=digits["model"], profiles=("coral-edgetpu",), formats=("tflite",), calibration=digits["calib"],
                          eval=digits["eval"], out=tmp_path, max_accuracy_drop=-1.0, allow_over_budget=True, latency_runs=5)
    (r,) = run_convert(opts).results
    names = [a.recipe for a in r.attempts]
    assert "int16x8" not in names  # the Edge TPU has no int16 kernels
    best = min(r.attempts, key=lambda a: a.selection.accuracy_drop)  # kept by the selection split's drop, the search's decision
    chosen = next(a for a in r.attempts if a.chosen)
    assert sum(a.chosen for a in r.attempts) == 1 and chosen.selection.accuracy_drop == best.selection.accuracy_drop
    assert any("over the accuracy budget" in w for w in r.warnings)
    assert r.manifest.quantization.attempts == r.attempts


def test_cli_convert_json(digits, tmp_path: Path, run_cli) -> None:
    code, out, _ = run_cli("convert", digits["model"], "--profile", "pixel-8", "--format", "tflite", "--calibration", digits["calib"],
                           "--eval", digits["eval"], "--out", tmp_path, "--name", "d", "--latency-runs", "5", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["results"][0]["profile"] == "pixel-8" and (tmp_path / "d-pixel-8-tflite" / "manifest.json").exists()


def test_rerun_replaces_bundles_atomically(digits, tmp_path: Path) -> None:
    opts = ConvertOptions(model=digits["model"], profiles=("raspberry-pi-5",), formats=("tflite",), calibration=digits["calib"],
                          eval=digits["eval"], out=tmp_path, latency_runs=5)
    run_convert(opts)
    run_convert(opts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-raspberry-pi-5-tflite", "report.json", "report.md"]
