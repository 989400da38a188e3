"""`edgekit router calibrate` and `edgekit router eval` on the digits models, and their bad-input paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgekit.bundle import open_bundle, verify_bundle


def test_max_loss_writes_a_signed_bundle_with_the_policy_and_a_report(run_cli, device_bundle: Path, digits_cloud, tmp_path: Path) -> None:
    code, out, err = run_cli("router", "calibrate", "--device", device_bundle, "--cloud", digits_cloud["onnx"], "--data",
                             digits_cloud["calib"], "--max-loss", "3", "--out", tmp_path / "cal", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["feasible"] and s["target"] == {"kind": "max_loss", "value": 3.0, "confidence": 0.95}
    assert s["temperature_examples"] + s["threshold_examples"] == 300
    assert s["loss_bound_points"] <= 3.0
    assert s["escalation_rate"] >= s["point_estimate"]["escalation_rate"]
    assert s["guarantee_extra_escalation"] == pytest.approx(s["escalation_rate"] - s["point_estimate"]["escalation_rate"])
    bundle = Path(s["bundle"])
    assert verify_bundle(bundle).ok
    policy = open_bundle(bundle).manifest.router_policy
    assert policy is not None and policy.threshold == pytest.approx(s["threshold"]) and policy.temperature == pytest.approx(s["temperature"])
    assert policy.expected_escalation_rate == pytest.approx(s["escalation_rate"]) and len(policy.data_sha256) == 64
    assert policy.device_output == "probabilities"
    for f in ("reliability.png", "accuracy_vs_escalation.png", "router_report.json", "router_report.md"):
        assert (tmp_path / "cal" / f).stat().st_size > 0
    assert (tmp_path / "cal" / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ece_before" in s and "ece_after" in s
    # the original bundle is untouched and still valid with router_policy null
    assert open_bundle(device_bundle).manifest.router_policy is None and verify_bundle(device_bundle).ok


def test_escalation_budget_is_respected(calibrated, digits_cloud) -> None:
    s = calibrated.summary
    assert s["target"]["kind"] == "escalation_budget"
    assert 0 < s["escalation_rate"] <= 0.3
    assert "loss_points" in s and "loss_bound_points" in s
    assert calibrated.policy.target.value == 0.3


def test_calibrated_threshold_holds_on_the_test_split(calibrated, digits_cloud) -> None:
    """The expected escalation rate carries over to unseen data from the same distribution (loosely)."""
    from edgekit.runtime import load
    from hybrid_router.policy import EscalationPolicy, decide_batch

    d = np.load(digits_cloud["test"])
    _, _, _, esc = decide_batch(load(calibrated.bundle).predict(d["x"]), EscalationPolicy.from_router_policy(calibrated.policy))
    assert abs(esc.mean() - calibrated.policy.expected_escalation_rate) < 0.15


def test_a_target_no_kept_threshold_can_certify_escalates_everything(run_cli, device_bundle: Path, digits_cloud, tmp_path: Path) -> None:
    code, out, err = run_cli("router", "calibrate", "--device", device_bundle, "--cloud", digits_cloud["onnx"], "--data",
                             digits_cloud["calib"], "--max-loss", "0.1", "--out", tmp_path / "cal", "--json")
    assert code == 0, err
    s = json.loads(out)
    # 240 threshold examples cannot certify 0.1 points while keeping anything on the device; cloud-only meets it (loss 0)
    assert s["escalates_everything"] and s["escalation_rate"] == 1.0 and s["loss_bound_points"] == 0.0
    assert s["certified_at_full_escalation_points"] == 0.0 and s["best_certifiable_loss_points"] > 0.1
    policy = open_bundle(Path(s["bundle"])).manifest.router_policy
    assert policy.threshold > 1.0  # above every score: every input escalates
    assert "escalates everything" in (tmp_path / "cal" / "router_report.md").read_text()


def test_calibration_picks_a_score_and_says_which(calibrated) -> None:
    from hybrid_router.policy import SCORES

    s = calibrated.summary
    assert set(s["scores"]) == set(SCORES) and s["score"] in SCORES
    assert calibrated.policy.method == s["score"]
    # chosen on the temperature split by ranking, not by what it escalates on the threshold split
    assert s["scores"][s["score"]]["selection_auc"] == max(c["selection_auc"] for c in s["scores"].values())
    assert "chosen on the temperature split" in s["bound"]
    assert calibrated.policy.classes == 10 and calibrated.policy.device_model_sha256 is not None


def test_a_fixed_score_is_tested_at_the_full_confidence(device_bundle: Path, digits_cloud, tmp_path: Path) -> None:
    from hybrid_router.calibrate import calibrate_router

    r = calibrate_router(device_bundle, digits_cloud["onnx"], digits_cloud["calib"], tmp_path, max_loss=3, score_method="entropy")
    assert r.policy.method == "entropy" and set(r.summary["scores"]) == {"entropy"} and "chosen on the temperature split" not in r.summary["bound"]


def test_no_examples_is_refused(run_cli, device_bundle: Path, digits_cloud, tmp_path: Path) -> None:
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 8, 8, 1), np.float32), y=np.zeros((0,), np.int64))
    code, _, err = run_cli("router", "calibrate", "--device", device_bundle, "--cloud", digits_cloud["onnx"], "--data",
                           tmp_path / "empty.npz", "--max-loss", "1", "--out", tmp_path / "cal")
    assert code == 3 and "Error: " in err and "no labelled examples" in err and "Hint: " in err and "Traceback" not in err
    assert not (tmp_path / "cal").exists()


def test_labels_outside_the_classes_are_refused(run_cli, device_bundle: Path, digits_cloud, tmp_path: Path) -> None:
    d = np.load(digits_cloud["calib"])
    y = d["y"].copy()
    y[5] = 12
    np.savez(tmp_path / "bad.npz", x=d["x"], y=y)
    code, _, err = run_cli("router", "calibrate", "--device", device_bundle, "--cloud", digits_cloud["onnx"], "--data",
                           tmp_path / "bad.npz", "--max-loss", "1", "--out", tmp_path / "cal")
    assert code == 3 and "outside the model's 10 classes" in err and "Hint: " in err


def test_data_without_labels_is_refused(run_cli, device_bundle: Path, digits_cloud, tmp_path: Path) -> None:
    np.savez(tmp_path / "x_only.npz", x=np.load(digits_cloud["calib"])["x"])
    code, _, err = run_cli("router", "calibrate", "--device", device_bundle, "--cloud", digits_cloud["onnx"], "--data",
                           tmp_path / "x_only.npz", "--escalation-budget", "0.2", "--out", tmp_path / "cal")
    assert code == 3 and "no labels" in err


def _onnx_classifier(path: Path, classes: int, seed: int = 0) -> Path:
    """A real ONNX graph over 8x8x1 inputs: Flatten -> MatMul -> Softmax with `classes` outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).normal(size=(64, classes)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["z"]),
             helper.make_node("Softmax", ["z"], ["probs"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8, 8, 1])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("classes,fragment", [(5, "outputs per example"), (10, "do not match the device model's classes")])
def test_a_cloud_model_with_other_classes_is_refused(run_cli, device_bundle: Path, digits_cloud, tmp_path: Path, classes: int,
                                                     fragment: str) -> None:
    cloud = _onnx_classifier(tmp_path / "other.onnx", classes)  # random weights: 10 classes, but not the digits'
    code, _, err = run_cli("router", "calibrate", "--device", device_bundle, "--cloud", cloud, "--data", digits_cloud["calib"],
                           "--escalation-budget", "0.2", "--out", tmp_path / "cal")
    assert code == 4 and fragment in err and "Hint:" in err


@pytest.mark.parametrize("args,fragment", [(("--max-loss", "1", "--escalation-budget", "0.2"), "exactly one"), ((), "exactly one"),
                                           (("--escalation-budget", "1.5"), "fraction")])
def test_target_flags_are_checked(run_cli, device_bundle: Path, digits_cloud, tmp_path: Path, args, fragment: str) -> None:
    code, _, err = run_cli("router", "calibrate", "--device", device_bundle, "--cloud", digits_cloud["onnx"], "--data",
                           digits_cloud["calib"], *args, "--out", tmp_path / "cal")
    assert code == 2 and fragment in err


def test_eval_against_the_live_cloud_and_a_stopped_one(run_cli, calibrated, cloud: str, digits_cloud, refused_url: str) -> None:
    code, out, err = run_cli("router", "eval", "--bundle", calibrated.bundle, "--cloud-url", cloud, "--cloud-model", "digits",
                             "--data", digits_cloud["test"], "--json")
    assert code == 0, err
    live = json.loads(out)
    assert live["answered"] == live["examples"] == 100
    assert live["degraded"] == 0 and live["cloud_accuracy"] is not None
    assert live["answered_by_cloud"] == round(live["escalation_rate"] * 100) > 0
    code, out, err = run_cli("router", "eval", "--bundle", calibrated.bundle, "--cloud-url", refused_url, "--cloud-model", "digits",
                             "--data", digits_cloud["test"], "--json")
    assert code == 0, err
    down = json.loads(out)
    assert down["cloud_accuracy"] is None and down["cloud_error"] == "unreachable"
    assert down["answered"] == 100 and down["answered_by_cloud"] == 0
    assert down["degraded"] == round(down["escalation_rate"] * 100) > 0
    assert set(down["degraded_reasons"]) <= {"unreachable", "circuit_open"}
    assert down["hybrid_accuracy"] == pytest.approx(down["device_accuracy"])


def test_eval_against_a_cloud_with_another_class_count_is_refused(run_cli, calibrated, digits_cloud, bad_cloud) -> None:
    bad_cloud.meta_classes = 20
    code, _, err = run_cli("router", "eval", "--bundle", calibrated.bundle, "--cloud-url", bad_cloud.url, "--cloud-model", "digits",
                           "--data", digits_cloud["test"])
    assert code == 4 and "answers 20 classes, the device model has 10" in err and "Hint: " in err
    assert bad_cloud.posts == 0


def test_eval_refuses_a_bundle_whose_policy_is_from_another_model(run_cli, calibrated, digits_cloud, bad_cloud, tmp_path: Path) -> None:
    from edgekit import signing
    from edgekit.bundle import write_bundle

    b = open_bundle(calibrated.bundle)
    fields = b.manifest.model_dump(mode="json", exclude={"file", "sha256", "size_bytes", "extra_files", "golden"})
    fields["router_policy"]["device_model_sha256"] = "ab" * 32  # a policy copied over from another model's bundle
    other = write_bundle(tmp_path / "other", fields, b.model_path, b.golden(), signing_key=signing.load_or_create_key(),
                         min_top1_agreement=b.manifest.golden.min_top1_agreement, atol=b.manifest.golden.atol)
    code, _, err = run_cli("router", "eval", "--bundle", other.root, "--cloud-url", bad_cloud.url, "--cloud-model", "digits",
                           "--data", digits_cloud["test"])
    assert code == 3 and "calibrated for device model abababababab" in err and "Hint:" in err
    assert bad_cloud.posts == 0
