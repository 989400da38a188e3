"""A bundle converted with its logits output (edgekit convert's default): calibration and the classifier score the logits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from edgekit.bundle import open_bundle, verify_bundle
from hybrid_router import HybridClassifier
from hybrid_router.policy import calibrated_probs, score

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "tests"


@pytest.fixture(scope="module")
def logits_bundle(digits) -> Path:
    """The digits INT8 TFLite bundle for raspberry-pi-5 with --confidence-output auto (the default), converted once and cached."""
    d = CACHE / "router-device-bundle-logits-v1"
    if (d / "bundle" / "manifest.json").exists():
        return d / "bundle"
    from converters.pipeline import ConvertOptions, run_convert

    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    opts = ConvertOptions(model=digits["model"], profiles=("raspberry-pi-5",), formats=("tflite",), calibration=digits["calib"],
                          eval=digits["eval"], out=tmp / "out", name="digits", version="1.2.3", latency_runs=10)
    report = run_convert(opts)
    os.replace(report.results[0].bundle_dir, tmp / "bundle")
    os.replace(tmp, d)
    return d / "bundle"


def test_calibration_reads_the_logits_output_and_says_so(logits_bundle, digits_cloud, run_cli, tmp_path: Path) -> None:
    logits = open_bundle(logits_bundle).manifest.confidence_output
    assert logits is not None and logits.dtype == "int8"  # full-integer TFLite: int8 logits with their own scale
    code, out, err = run_cli("router", "calibrate", "--device", logits_bundle, "--cloud", digits_cloud["onnx"], "--data", digits_cloud["calib"],
                             "--escalation-budget", "0.3", "--out", tmp_path / "cal", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["score_output"] == logits.name and s["device_output"] == "logits"
    assert s["score"] in ("max_softmax", "margin", "entropy") and set(s["scores"]) == {"max_softmax", "margin", "entropy"}
    assert s["probability_floor"] == 1e-6  # no quantized-zero floor: these are logits, not probabilities
    assert f"read from output `{logits.name}`" in (tmp_path / "cal" / "router_report.md").read_text()
    policy = open_bundle(s["bundle"]).manifest.router_policy
    assert policy.score_output == logits.name and policy.device_output == "logits" and policy.method == s["score"]
    assert verify_bundle(s["bundle"]).ok
    code, out, err = run_cli("router", "calibrate", "--device", logits_bundle, "--cloud", digits_cloud["onnx"], "--data", digits_cloud["calib"],
                             "--escalation-budget", "0.3", "--out", tmp_path / "cal2")
    assert code == 0 and f"read from output '{logits.name}'" in out


def test_the_classifier_scores_the_logits_output(logits_bundle, digits_cloud, tmp_path: Path) -> None:
    from hybrid_router.calibrate import calibrate_router

    cal = calibrate_router(logits_bundle, digits_cloud["onnx"], digits_cloud["calib"], tmp_path / "cal", escalation_budget=0.3,
                           score_method="margin")
    clf = HybridClassifier.from_bundle(cal.bundle)  # no cloud: escalations answer degraded, the decision is what we check
    model = clf._route.model
    name = cal.policy.score_output
    assert name == model.manifest.confidence_output.name and clf.policy.score_output == name
    x = np.load(digits_cloud["test"])["x"]
    preds = clf.predict_batch(x)
    z = model.run({model.inputs[0].name: x})[name]
    p = calibrated_probs(z, cal.policy.temperature, "logits")
    conf = score(p, "margin")
    np.testing.assert_allclose([q.confidence for q in preds], conf, rtol=1e-9)
    assert [q.escalated for q in preds] == list(conf < cal.policy.threshold)
    assert [q.label for q in preds if not q.escalated] == list(p.argmax(axis=1)[conf >= cal.policy.threshold])
    # the app still gets its own output from predict(): the INT8 softmax, not the logits
    app = model.predict(x)
    assert app.min() >= 0 and np.allclose(app.sum(axis=1), 1.0, atol=0.03)
    assert float((app.argmax(axis=1) == z.argmax(axis=1)).mean()) >= 0.97
    # the logits give the scores a resolution the INT8 softmax cannot: far fewer ties among the confidences
    probs_only = score(calibrated_probs(app, cal.policy.temperature, "probabilities", 1 / 512), "margin")
    assert len(np.unique(conf)) > len(np.unique(probs_only))
