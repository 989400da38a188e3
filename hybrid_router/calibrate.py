"""``edgekit router calibrate`` as a function: fit the temperature, choose the threshold, write the bundle and report.

The labelled data is shuffled once (seeded) and split: the first ``temperature_fraction``
fits the temperature, the rest chooses the threshold (hybrid_router.calibration). The new
bundle is the device bundle with ``router_policy`` in its manifest, re-signed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekit import signing
from edgekit.bundle import open_bundle, write_bundle
from edgekit.errors import CalibrationDataError, IncompatibleError, OutputError, UsageError
from edgekit.manifest import ConfidenceHistogram, RouterPolicy, RouterTarget
from hybrid_router.calibration import (choose_for_budget, choose_for_max_loss, escalation_curve, expected_calibration_error,
                                       fit_temperature, reliability_bins)
from hybrid_router.policy import SCORES, calibrated_probs, score

__all__ = ["CalibrationResult", "calibrate_router", "choose_score", "confidence_histogram", "load_labelled", "output_kind"]

TELEMETRY_BINS = 10  # device telemetry's confidence histogram: bin min(9, int(confidence * 10)) (device_agents.telemetry.Recorder)


@dataclass(frozen=True)
class CalibrationResult:
    """What calibration produced; ``summary`` is the JSON report."""

    bundle: Path | None
    report_dir: Path
    policy: RouterPolicy | None
    summary: dict = field(default_factory=dict)


def confidence_histogram(conf: np.ndarray) -> ConfidenceHistogram:
    """The confidence scores binned exactly as device telemetry bins them: 10 equal bins over [0, 1], bin
    ``min(9, max(0, int(c * 10)))``, so the fleet server can compare field histograms with it bin for bin."""
    which = np.clip((np.asarray(conf, dtype=np.float64) * TELEMETRY_BINS).astype(np.int64), 0, TELEMETRY_BINS - 1)
    counts = np.bincount(which, minlength=TELEMETRY_BINS)
    return ConfidenceHistogram(edges=[round(i / TELEMETRY_BINS, 10) for i in range(TELEMETRY_BINS + 1)], counts=[int(c) for c in counts])


def load_labelled(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """``x`` and integer ``y`` from an .npz, and the file's sha256."""
    if not path.is_file():
        raise CalibrationDataError(f"{path}: no such data file")
    try:
        with np.load(path, allow_pickle=False) as d:
            files = set(d.files)
            if "x" not in files:
                raise CalibrationDataError(f"{path}: no array 'x' (found: {', '.join(sorted(files)) or 'nothing'})")
            if "y" not in files:
                raise CalibrationDataError(f"{path}: no labels: calibration needs an array 'y' of class indices next to 'x'",
                                           "Save the data with np.savez(path, x=inputs, y=labels).")
            x, y = d["x"], d["y"]
    except (OSError, ValueError) as e:
        raise CalibrationDataError(f"{path}: not a readable .npz ({e})") from None
    if len(x) == 0:
        raise CalibrationDataError(f"{path}: no labelled examples ('x' is empty)", "Give at least 70 labelled examples (20 fit the "
                                   "temperature, 50 choose the threshold); a few hundred give a useful guarantee.")
    if len(x) != len(y) or y.ndim != 1:
        raise CalibrationDataError(f"{path}: 'x' has {len(x)} examples but 'y' has shape {y.shape}")
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise CalibrationDataError(f"{path}: 'y' must hold integer class indices, not {y.dtype}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise CalibrationDataError(f"{path}: 'x' holds NaN or infinity")
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return x.astype(np.float32, copy=False), y.astype(np.int64), sha


def output_kind(outputs: np.ndarray) -> str:
    """``probabilities`` when every row is non-negative and sums to 1 (int8 rounding allowed), else ``logits``."""
    sums = outputs.sum(axis=1)
    return "probabilities" if outputs.min() >= 0 and np.all(np.abs(sums - 1.0) < 0.03) else "logits"


def _check_classes(dev: np.ndarray, cloud: np.ndarray, y: np.ndarray, labels: tuple[str, ...]) -> None:
    if cloud.ndim != 2 or cloud.shape[1] != dev.shape[1]:
        raise IncompatibleError(f"the cloud model gives {cloud.shape[1:]} outputs per example, the device model {dev.shape[1]} classes",
                                "Calibrate against a cloud model trained on the same classes, in the same order.")
    if y.min() < 0 or y.max() >= dev.shape[1]:
        raise CalibrationDataError(f"labels run from {y.min()} to {y.max()}, outside the model's {dev.shape[1]} classes",
                                   f"Labels are class indices 0-{dev.shape[1] - 1} in the order of the device model's labels "
                                   f"({', '.join(labels[:10]) or 'none recorded'}).")
    agree = float((dev.argmax(1) == cloud.argmax(1)).mean())
    cloud_acc = float((cloud.argmax(1) == y).mean())
    dev_acc = float((dev.argmax(1) == y).mean())
    chance = 1.0 / dev.shape[1]
    if agree < 0.5 and cloud_acc < max(0.5, dev_acc / 2, 2 * chance):
        raise IncompatibleError(f"the cloud model's answers do not match the device model's classes (top-1 agreement "
                                f"{agree:.1%}, cloud accuracy {cloud_acc:.1%}, device accuracy {dev_acc:.1%})",
                                f"Check that both models use the same labels in the same order ({', '.join(labels[:10]) or 'no labels'}).")


def _score_output(model) -> str | None:
    """The device output calibration reads: the bundle's confidence output (the logits its converter kept before the app's
    softmax, ``Manifest.confidence_output``, any dtype: the runtime dequantizes it); else a float or int16 output of the
    first one's shape beside it; else None (the first output, dequantized)."""
    outs = tuple(getattr(model, "outputs", ()))
    if len(outs) < 2:
        return None
    manifest = getattr(model, "manifest", None)
    marked = manifest.confidence_output if manifest is not None else None
    if marked is not None and any(o.name == marked.name for o in outs):
        return marked.name
    first = outs[0].shape
    for o in outs[1:]:
        if o.dtype in ("float32", "float16", "int16") and tuple(o.shape) == tuple(first):
            return o.name
    return None


def _choose(conf: np.ndarray, dev_ok: np.ndarray, cloud_ok: np.ndarray, cloud_acc: float, max_loss: float | None,
            budget: float | None, delta: float) -> dict:
    """The threshold one score gives for the target, as report fields plus a ``rank`` (lower is better)."""
    if max_loss is not None:
        ch = choose_for_max_loss(conf, dev_ok, cloud_ok, max_loss / 100.0, delta)
        everything = not ch.feasible  # nothing certifiable keeps an example on the device: escalate all (cloud-only, loss 0)
        threshold, esc, loss, bound = (ch.threshold, 1.0, 0.0, 0.0) if everything else (ch.threshold, ch.escalation, ch.loss, ch.loss_bound)
        return {"threshold": threshold, "escalation_rate": esc, "hybrid_accuracy": cloud_acc - loss, "loss_points": loss * 100,
                "loss_bound_points": bound * 100, "escalates_everything": everything,
                "point_estimate": {"threshold": ch.point_threshold, "escalation_rate": ch.point_escalation, "loss_points": ch.point_loss * 100},
                "guarantee_extra_escalation": esc - ch.point_escalation,
                "best_certifiable_loss_points": ch.best_bound * 100, "best_certifiable_escalation_rate": ch.best_bound_escalation,
                "rank": (esc, bound)}
    bc = choose_for_budget(conf, dev_ok, cloud_ok, float(budget), delta)
    return {"threshold": bc.threshold, "escalation_rate": bc.escalation, "hybrid_accuracy": cloud_acc - bc.loss,
            "loss_points": bc.loss * 100, "loss_bound_points": bc.loss_bound * 100, "rank": (bc.loss_bound, bc.loss, bc.escalation)}


def ranking_auc(scores: np.ndarray, correct: np.ndarray) -> float:
    """How well a score ranks right answers above wrong ones: P(score of a right one > score of a wrong one), ties half."""
    from scipy.stats import rankdata

    pos, neg = int(correct.sum()), int((~correct).sum())
    if pos == 0 or neg == 0:
        return 0.5
    ranks = rankdata(scores)
    return float((ranks[correct].sum() - pos * (pos + 1) / 2) / (pos * neg))


def choose_score(probs: np.ndarray, dev_ok: np.ndarray, cloud_ok: np.ndarray, *, max_loss: float | None, budget: float | None,
                 confidence: float, score_method: str = "auto", select_probs: np.ndarray | None = None,
                 select_ok: np.ndarray | None = None) -> tuple[str, dict, dict[str, dict]]:
    """The score and threshold for the target on the threshold split: (score, its report fields, every score's fields).

    With ``auto`` the score is chosen on *other* data (``select_probs``/``select_ok``: the temperature
    split): the one that best ranks the device's right answers above its wrong ones
    (:func:`ranking_auc`). The choice is then independent of the threshold split, so the chosen
    score's threshold is certified at the full ``1 - confidence``; picking the best of several on the
    threshold split itself would need a union bound (δ/3 each), which with a few hundred examples
    cannot certify half a point at all. Every score's threshold is reported, only the chosen one is
    certified.
    """
    delta = 1.0 - confidence
    cloud_acc = float(cloud_ok.mean())
    methods = SCORES if score_method == "auto" else (score_method,)
    candidates = {m: _choose(score(probs, m), dev_ok, cloud_ok, cloud_acc, max_loss, budget, delta) for m in methods}
    if len(methods) == 1:
        return methods[0], candidates[methods[0]], candidates
    if select_probs is None or select_ok is None:
        raise ValueError("score_method='auto' needs select_probs and select_ok (data apart from the threshold split)")
    for m in methods:
        candidates[m]["selection_auc"] = ranking_auc(score(select_probs, m), select_ok)
    method = max(methods, key=lambda m: candidates[m]["selection_auc"])  # ties: the first, max_softmax
    return method, candidates[method], candidates


def calibrate_router(device: Path, cloud: Path, data: Path, out: Path, *, max_loss: float | None = None,
                     escalation_budget: float | None = None, confidence: float = 0.95, temperature_fraction: float = 0.2,
                     seed: int = 0, score_method: str = "auto", step: Callable[[str], None] = lambda _m: None) -> CalibrationResult:
    """Calibrate; ``max_loss`` in accuracy points, ``escalation_budget`` a fraction.

    ``score_method``: one of :data:`~hybrid_router.policy.SCORES`, or ``auto``: chosen on the
    temperature split (:func:`choose_score`). A ``max_loss`` target is always met: when no threshold that keeps examples
    on the device can be certified, the policy escalates everything (cloud-only: loss 0 by construction).
    """
    from edgekit.runtime import load
    from hybrid_router.cloud_model import OnnxCloudModel
    from hybrid_router.report import plot_accuracy_vs_escalation, plot_reliability

    if (max_loss is None) == (escalation_budget is None):
        raise UsageError("give exactly one of --max-loss and --escalation-budget")
    if max_loss is not None and not 0 <= max_loss < 100:
        raise UsageError(f"--max-loss is in accuracy points (0-100), got {max_loss}")
    if escalation_budget is not None and not 0 <= escalation_budget <= 1:
        raise UsageError(f"--escalation-budget is a fraction of traffic (0-1), got {escalation_budget}")
    if not 0.5 <= confidence < 1 or not 0 < temperature_fraction < 1:
        raise UsageError("--confidence must be in [0.5, 1) and the temperature fraction in (0, 1)")
    if score_method != "auto" and score_method not in SCORES:
        raise UsageError(f"--score {score_method!r} is not one of auto, {', '.join(SCORES)}")
    step("loading data and models")
    x, y, data_sha = load_labelled(data)
    n_t = int(round(len(x) * temperature_fraction))
    if n_t < 20 or len(x) - n_t < 50:
        raise CalibrationDataError(f"{len(x)} labelled examples are too few (need >= 20 for the temperature and >= 50 for the threshold)",
                                   "Give a few hundred labelled examples the models have not been trained on.")
    bundle = open_bundle(device)
    dev_model = load(device)
    cloud_model = OnnxCloudModel(cloud, providers=["CPUExecutionProvider"])
    score_output = _score_output(dev_model)
    step(f"running the device model on {len(x)} examples")
    if score_output is None:
        dev_out = np.asarray(dev_model.predict(x), dtype=np.float64)
    else:
        dev_out = np.asarray(dev_model.run({dev_model.inputs[0].name: x})[score_output], dtype=np.float64)
    if not np.isfinite(dev_out).all():
        raise IncompatibleError("the device model gives NaN or infinity on the calibration data", "Check the bundle: edgekit bundle verify.")
    step(f"running the cloud model on {len(x)} examples")
    cloud_out = np.asarray(cloud_model.predict(x), dtype=np.float64)
    _check_classes(dev_out, cloud_out, y, bundle.manifest.labels)
    kind = output_kind(dev_out)
    q = next((o.quantization for o in dev_model.outputs if o.name == score_output), None) if score_output else \
        (dev_model.outputs[0].quantization if dev_model.outputs else None)
    floor = q.scale / 2 if (q is not None and kind == "probabilities") else 1e-6  # a quantized zero means "under half a step"

    idx = np.random.default_rng(seed).permutation(len(x))
    t_idx, s_idx = idx[:n_t], idx[n_t:]
    step("fitting the temperature")
    temperature = fit_temperature(dev_out[t_idx], y[t_idx], kind, floor)
    ys = y[s_idx]
    raw = dev_out[s_idx] if kind == "probabilities" else calibrated_probs(dev_out[s_idx], 1.0, "logits")
    probs = calibrated_probs(dev_out[s_idx], temperature, kind, floor)
    ece_before, ece_after = expected_calibration_error(raw, ys), expected_calibration_error(probs, ys)
    dev_ok = probs.argmax(axis=1) == ys
    cloud_ok = cloud_out[s_idx].argmax(axis=1) == ys
    delta = 1.0 - confidence
    dev_acc, cloud_acc = float(dev_ok.mean()), float(cloud_ok.mean())
    methods = SCORES if score_method == "auto" else (score_method,)

    step("choosing the score and the threshold")
    summary: dict = {
        "device_bundle": str(device), "cloud_model": str(cloud), "data": str(data), "data_sha256": data_sha,
        "examples": len(x), "temperature_examples": int(n_t), "threshold_examples": int(len(s_idx)), "seed": seed,
        "device_output": kind, "score_output": score_output, "probability_floor": floor, "temperature": temperature,
        "ece_before": ece_before, "ece_after": ece_after,
        "device_accuracy": dev_acc, "cloud_accuracy": cloud_acc, "confidence": confidence,
    }
    probs_t = calibrated_probs(dev_out[t_idx], temperature, kind, floor)
    method, chosen, candidates = choose_score(probs, dev_ok, cloud_ok, max_loss=max_loss, budget=escalation_budget,
                                              confidence=confidence, score_method=score_method, select_probs=probs_t,
                                              select_ok=probs_t.argmax(axis=1) == y[t_idx])
    conf = score(probs, method)
    curve = escalation_curve(conf, dev_ok, cloud_ok)
    threshold, esc, loss, bound = chosen["threshold"], chosen["escalation_rate"], chosen["loss_points"] / 100, chosen["loss_bound_points"] / 100
    point = None
    how = (f"score {method} chosen on the temperature split (best ranking AUC of {', '.join(methods)}), so its threshold is "
           f"tested at the full delta; " if len(methods) > 1 else "")
    if max_loss is not None:
        target = RouterTarget(kind="max_loss", value=max_loss, confidence=confidence)
        point = (chosen["point_estimate"]["escalation_rate"], cloud_acc - chosen["point_estimate"]["loss_points"] / 100)
        summary["bound"] = (how + f"Learn-then-Test fixed sequence, Clopper-Pearson (exact binomial) p-values on the harmful rate, "
                            f"delta={delta:g}")
    else:
        target = RouterTarget(kind="escalation_budget", value=float(escalation_budget), confidence=confidence)
        summary["bound"] = how + f"Clopper-Pearson upper bound on the harmful rate at delta={delta:g}"
    summary.update({"target": target.model_dump(), "feasible": True, "score": method,
                    "scores": {m: {k: v for k, v in c.items() if k != "rank"} for m, c in candidates.items()},
                    **{k: v for k, v in chosen.items() if k != "rank"}})
    # Escalating everything is the cloud-only policy: its loss against cloud-only is 0 on any data, so any loss target is met.
    summary["certified_at_full_escalation_points"] = 0.0

    step("writing the report")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output directory ({e.strerror})") from None
    rel = plot_reliability(reliability_bins(raw, ys), reliability_bins(probs, ys), ece_before, ece_after, temperature, out / "reliability.png")
    ave = plot_accuracy_vs_escalation(curve["escalation"], curve["hybrid_accuracy"], dev_acc, cloud_acc, (esc, cloud_acc - loss), point,
                                      max_loss / 100.0 if max_loss is not None else None, out / "accuracy_vs_escalation.png")
    summary["figures"] = {"reliability": str(rel), "accuracy_vs_escalation": str(ave)}
    summary["curve"] = {k: [round(float(v), 6) for v in curve[k]] for k in ("threshold", "escalation", "hybrid_accuracy")}
    report = out / "router_report.json"

    policy = RouterPolicy(
        method=method, score_output=score_output, classes=int(dev_out.shape[1]), device_model_sha256=bundle.manifest.sha256,
        device_output=kind, temperature=temperature, probability_floor=floor, threshold=min(threshold, 1.000001), target=target,
        expected_escalation_rate=esc, expected_loss_points=loss * 100, loss_bound_points=bound * 100,
        point_estimate_threshold=summary.get("point_estimate", {}).get("threshold"),
        point_estimate_escalation_rate=summary.get("point_estimate", {}).get("escalation_rate"),
        bound=summary["bound"], cloud_model=Path(cloud).name, cloud_model_sha256=cloud_model.sha256, data_sha256=data_sha,
        temperature_samples=int(n_t), threshold_samples=int(len(s_idx)), ece_before=ece_before, ece_after=ece_after,
        confidence_histogram=confidence_histogram(conf), created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    step("writing the calibrated bundle")
    dest = out / bundle.root.name
    if dest.resolve() == bundle.root.resolve():
        raise OutputError(f"{out}: writing the calibrated bundle there would overwrite the input bundle", "Choose another --out.")
    fields = bundle.manifest.model_dump(mode="json", exclude={"file", "sha256", "size_bytes", "extra_files", "golden"})
    fields["router_policy"] = policy.model_dump(mode="json")
    extras = tuple((bundle.root / e.file, e.purpose) for e in bundle.manifest.extra_files)
    written = write_bundle(dest, fields, bundle.model_path, bundle.golden(), signing_key=signing.load_or_create_key(),
                           min_top1_agreement=bundle.manifest.golden.min_top1_agreement, atol=bundle.manifest.golden.atol,
                           extra_files=extras)
    summary["bundle"] = str(written.root)
    report.write_text(json.dumps(summary, indent=2) + "\n")
    (out / "router_report.md").write_text(render_markdown(summary))
    return CalibrationResult(written.root, out, policy, summary)


def render_markdown(s: dict) -> str:
    """The report for people."""
    lines = ["# Router calibration", "",
             f"- Device bundle: `{s['device_bundle']}`; cloud model: `{s['cloud_model']}`",
             f"- Data: `{s['data']}` ({s['examples']} examples: {s['temperature_examples']} fit the temperature, "
             f"{s['threshold_examples']} choose the threshold)",
             f"- Temperature: {s['temperature']:.4f} (device output: {s['device_output']}); "
             f"ECE {s['ece_before']:.4f} before, {s['ece_after']:.4f} after scaling",
             f"- On the threshold split: device-only {s['device_accuracy'] * 100:.2f}%, cloud-only {s['cloud_accuracy'] * 100:.2f}%, "
             f"hybrid {s['hybrid_accuracy'] * 100:.2f}%",
             f"- Threshold {s['threshold']:.6f}: escalates {s['escalation_rate'] * 100:.1f}% of traffic; "
             f"loss vs cloud-only {s['loss_points']:.2f} points (upper bound {s['loss_bound_points']:.2f} at {s['confidence']:.0%})",
             f"- Score: {s['score']} (" + ", ".join(f"{m}: escalates {c['escalation_rate'] * 100:.1f}%" for m, c in s["scores"].items()) + ")"
             + (f", read from output `{s['score_output']}` (the logits kept beside the app's softmax)" if s.get("score_output")
                else ", read from the app's output (no confidence output in the bundle)"),
             f"- Bound: {s['bound']}"]
    if "point_estimate" in s:
        pe = s["point_estimate"]
        lines.append(f"- Point-estimate threshold {pe['threshold']:.6f} would escalate {pe['escalation_rate'] * 100:.1f}%; the guarantee "
                     f"costs {s['guarantee_extra_escalation'] * 100:.1f} points of extra escalation")
        lines.append(f"- Certified at 100% escalation (cloud only): {s['certified_at_full_escalation_points']:.2f} points; the smallest "
                     f"loss this data certifies while keeping examples on the device: {s['best_certifiable_loss_points']:.2f} points "
                     f"(escalating {s['best_certifiable_escalation_rate'] * 100:.1f}%)")
        if s.get("escalates_everything"):
            lines.append("- No threshold that keeps examples on the device is certified at this target: the policy escalates "
                         "everything. More labelled data tightens the bound.")
    lines += ["", "![reliability](reliability.png)", "", "![accuracy vs escalation](accuracy_vs_escalation.png)", ""]
    return "\n".join(lines)
