"""Package one chosen candidate: inspect it, check the profile's memory, measure, write the signed bundle."""

from __future__ import annotations

import datetime as dt
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from converters.base import ConversionResult, Converter, ModelFacts
from converters.confidence import app_output_first, confidence_metrics
from converters.coverage import op_coverage
from converters.precision import precision_label
from converters.evaluate import Evaluation
from converters.search import Candidate, align
from converters.selection import MIN_SPLIT_EXAMPLES
from edgekit import signing
from edgekit.bundle import _size, write_bundle
from edgekit.errors import IncompatibleError
from edgekit.golden import golden_key
from edgekit.manifest import Metric, Preprocessing
from edgekit.profiles import HardwareProfile

if TYPE_CHECKING:
    from converters.pipeline import RunContext

__all__ = ["GOLDEN_COUNT", "package_candidate"]

GOLDEN_COUNT = 16


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("edgekit", "tensorflow-cpu", "tensorflow", "keras", "ai-edge-litert", "tf2onnx", "onnx", "onnxruntime", "coremltools", "torch",
                 "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def measured(value: float | None, unit: str = "", note: str = "") -> Metric:
    """A measured figure (not_measurable when None)."""
    return Metric(value=value, unit=unit, status="measured" if value is not None else "not_measurable", note=note)


def embedded_preprocessing(ctx: RunContext, conv: Converter) -> Preprocessing | None:
    """The preprocessing baked into the graph (ONNX with --embed-preprocessing), else None."""
    if ctx.opts.embed_preprocessing and conv.format == "onnx":
        return ctx.opts.preprocessing.model_copy(update={"embedded": True})
    return None


def _split_note(ctx: RunContext) -> str:
    split = ctx.split
    if split is None or split.optimistic:
        return f"on the same {len(ctx.evalset)} examples the recipe was chosen on (optimistic)"
    return f"on the test split ({len(split.test)} examples the choice never saw)"


def _interval_metrics(ev: Evaluation, prefix: str, note: str) -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    for key, ci, what in (("int8_accuracy", ev.accuracy_ci95, "Wilson score"), ("accuracy_drop", ev.drop_ci95, "Agresti-Min paired"),
                          ("agreement", ev.agreement_ci95, "Wilson score")):
        if ci is None or (key == "int8_accuracy" and ev.accuracy is None):
            continue
        unit = "pt" if key == "accuracy_drop" else "%"
        if key == "accuracy_drop" and ev.accuracy is None:
            what = "Wilson score on the disagreement"
        out[f"{prefix}{key}_ci95_low"] = measured(ci[0], unit, f"95% {what} interval, {note}")
        out[f"{prefix}{key}_ci95_high"] = measured(ci[1], unit, f"95% {what} interval, {note}")
    return out


def _evaluation_metrics(ctx: RunContext, cand: Candidate, on_host: str) -> dict[str, Metric]:
    j = ctx.test_judge or ctx.judge
    ev = cand.evaluation
    assert ev is not None
    where = _split_note(ctx)
    out: dict[str, Metric] = {"float_accuracy": measured(j.float_accuracy, "%", f"float source model, {where}")}
    if ev.task == "classification":
        out |= {
            "int8_accuracy": measured(ev.accuracy, "%", f"this model, {on_host}, {where}"),
            "accuracy_drop": Metric(value=ev.drop if j.metric is None else None, unit="pt", status="measured" if j.metric is None else "not_measurable",
                                    note=("float minus int8 accuracy" if ev.accuracy is not None else "disagreement with float (bounds the drop; no labels)")
                                    + f", {where}"),
            "agreement": measured(ev.agreement, "%", f"top-1 (over the class axis) equal to the float model's, {where}"),
        }
        if j.metric is None:
            out |= _interval_metrics(ev, "", where)
        sel = cand.selection
        if sel is not None and ctx.split is not None and not ctx.split.optimistic:
            out["selection_examples"] = measured(float(len(ctx.split.selection)), "examples", "the split the recipe was chosen on")
            out["test_examples"] = measured(float(len(ctx.split.test)), "examples", "the split the reported figures come from")
            out["selection_int8_accuracy"] = measured(sel.accuracy, "%", "this model on the selection split (the search's decision)")
            out["selection_accuracy_drop"] = measured(sel.drop if j.metric is None else None, "pt",
                                                      "float minus int8 on the selection split (the search's decision)")
    else:
        out |= {"int8_accuracy": measured(None, "%", f"task {ev.task}: see the per-output fidelity"),
                "accuracy_drop": measured(None, "pt", f"task {ev.task}: the budget is SQNR >= {j.min_sqnr_db:g} dB" if j.metric is None else "see metric"),
                "agreement": measured(None, "%", f"task {ev.task}: no top-1")}
    if j.metric is not None:
        out["metric"] = measured(ev.metric, "", f"--metric {ctx.opts.metric_name}, {on_host}, {where}")
        out["float_metric"] = measured(j.float_metric, "", f"float source model, {where}")
        out["metric_drop"] = measured(ev.drop, "", f"float minus this model, {where}")
    out["min_sqnr_db"] = measured(ev.min_sqnr_db, "dB", "lowest per-output SQNR against the float model")
    for name, f in ev.fidelity.items():
        out[f"sqnr_db.{name}"] = measured(f.sqnr_db, "dB", f"output '{name}' vs float, {on_host}")
        out[f"cosine.{name}"] = measured(f.cosine, "", f"output '{name}' cosine similarity with float")
        out[f"max_rel_error.{name}"] = measured(f.max_rel_error, "", f"output '{name}': max |q - f| / max |f|")
    out["max_abs_error"] = measured(ev.max_abs_error, "", "largest output difference from the float model")
    return out


def _golden(ctx: RunContext, facts: ModelFacts, cand: Candidate) -> dict[str, np.ndarray]:
    src = ctx.source
    in_map = align(facts.inputs, src.inputs, "input")
    out_map = align(facts.outputs, src.outputs, "output")
    g = min(GOLDEN_COUNT, len(ctx.evalset))
    golden: dict[str, np.ndarray] = {}
    for i, spec in enumerate(facts.inputs):
        golden[golden_key("x", i)] = ctx.evalset.x[in_map[spec.name]][:g]
    for j, spec in enumerate(facts.outputs):
        golden[golden_key("y_float", j)] = ctx.judge.float_out[out_map[spec.name]][:g]
        if cand.outputs is not None:
            golden[golden_key("y_host", j)] = np.asarray(cand.outputs[out_map[spec.name]][:g])
    return golden


def _atol(facts: ModelFacts, golden: dict[str, np.ndarray]) -> float:
    """3 quantization steps of the coarsest output (float outputs: 1e-3 of their largest magnitude, at least 1e-3)."""
    steps = []
    for j, spec in enumerate(facts.outputs):
        if spec.quantization is not None:
            steps.append(spec.quantization.scale)
        else:
            ref = golden.get(golden_key("y_host", j), golden.get(golden_key("y_float", j)))
            peak = float(np.abs(ref).max()) if ref is not None and ref.size else 0.0
            steps.append(max(1e-3, 1e-3 * peak))
    return float(3 * max(steps))


def recipe_is_int16(cand: Candidate) -> bool:
    """The candidate carries int16 activations (16x8): never INT8, always reported with its measured slowdown."""
    return cand.recipe.activations == "int16"


def check_memory(ctx: RunContext, prof: HardwareProfile, conv: Converter, facts: ModelFacts, path: Path) -> float:
    """Model file + activation arena against the profile's model budget; the peak in MB."""
    size = _size(path)
    peak_mb = (size + facts.activation_bytes) / 1e6
    if peak_mb > prof.memory.model_budget_mb:
        raise IncompatibleError(f"{prof.id}/{conv.format}: model {size/1e6:.2f} MB + activations {facts.activation_bytes/1e6:.2f} MB "
                                f"({facts.activation_note}) exceed the profile's model budget of {prof.memory.model_budget_mb:g} MB",
                                "Use a smaller model or another profile.")
    return peak_mb


def package_candidate(ctx: RunContext, prof: HardwareProfile, conv: Converter, stage: Path, key: signing.Ed25519PrivateKey,
                      cand: Candidate, attempts: list, warnings: list[str]) -> ConversionResult:
    """Write the bundle of the chosen candidate with its metrics, golden set and attempts."""
    opts = ctx.opts
    app_output_first(ctx, conv.format, cand.path)  # apps read output 0: the logits output goes after it
    facts = conv.inspect(cand.path, prof)
    warnings = [*warnings, *facts.warnings]
    coverage = op_coverage(facts.ops, prof, conv.format, facts.dtype_violations, model_path=cand.path)
    if facts.dtype_violations:
        raise IncompatibleError(f"{prof.id}/{conv.format}: ops outside full-integer: {'; '.join(facts.dtype_violations[:5])}",
                                "The profile requires full-integer models; this model has ops without int8 kernels.")
    peak_mb = check_memory(ctx, prof, conv, facts, cand.path)
    size = _size(cand.path)
    base = ctx.baseline(conv)
    runs, why_not = conv.runs_here()
    model = cand.model
    golden = _golden(ctx, facts, cand)
    on_host = f"on this conversion host ({model.runtime}+{model.delegate})" if model is not None else ""
    if cand.evaluation is None:
        na = lambda unit="": Metric(value=None, unit=unit, status="not_measurable", note=why_not)  # noqa: E731
        metrics = {"float_accuracy": measured(ctx.judge.float_accuracy, "%", "float source model"), "int8_accuracy": na("%"),
                   "accuracy_drop": na("pt"), "agreement": na("%"), "size_bytes": measured(float(size), "B"),
                   "float_size_bytes": measured(base["size_bytes"], "B", "float model in the same format"),
                   "size_ratio": measured(size / base["size_bytes"], "x", "quantized / float"), "host_latency_ms_p50": na("ms"), "latency_ratio": na("x")}
        verification: tuple[str, ...] = (f"numerics unverified on this host: {why_not}",)
    else:
        sp = cand.speed
        assert sp is not None  # every candidate that ran here was timed by the search
        metrics = _evaluation_metrics(ctx, cand, on_host)
        metrics |= {
            "size_bytes": measured(float(size), "B"),
            "float_size_bytes": measured(base["size_bytes"], "B", "float model in the same format"),
            "size_ratio": measured(size / base["size_bytes"], "x", "int8 / float"),
            "host_latency_ms_p50": measured(sp.p50_ms, "ms", sp.how),
            "float_host_latency_ms_p50": measured(sp.float_p50_ms, "ms", "float model in the same format, timed in the same rounds"),
            "latency_ratio": measured(sp.ratio, "x", "quantized / float on this host (median of the per-round ratios)"),
        }
        if metrics["size_ratio"].value > 1:
            warnings.append(f"the quantized model is {metrics['size_ratio'].value:.2f}x the float model's size ({_size_reason(metrics | dict(facts.metrics))})")
        chosen = attempts[cand.attempt_index]
        if sp.slower_than_float:
            warnings.append(f"on this host the quantized model is slower than float: {chosen.slower_than_float or f'{sp.ratio:.2f}x'} "
                            "(the device's own accelerator may differ)")
        if recipe_is_int16(cand):
            warnings.append(f"precision INT16x8, not INT8: measured {sp.ratio:.2f}x the float model's latency on this host "
                            f"({sp.p50_ms:.3f} vs {sp.float_p50_ms:.3f} ms, {sp.host.label})")
        split = ctx.split
        if split is None or split.optimistic:
            verification = (f"{ctx.judge.budget_text}: recipe chosen and measured {on_host} on the same {len(ctx.evalset)} examples "
                            f"(optimistic: fewer than {MIN_SPLIT_EXAMPLES} to split); latency measured there too ({sp.how})",)
        else:
            verification = (f"{ctx.judge.budget_text}: recipe chosen {on_host} on a selection split of {len(split.selection)} examples; the "
                            f"reported figures are on a test split of {len(split.test)} examples the choice never saw; latency measured "
                            f"there too ({sp.how})",)
            if cand.selection is not None and cand.selection.within_budget and cand.evaluation is not None and not cand.evaluation.within_budget:
                warnings.append(f"within the budget ({ctx.judge.budget_text}) on the selection split, not on the test split "
                                f"(drop {cand.evaluation.drop:.2f} there)")
        if cand.why:
            verification += (f"recipe: {cand.why}",)
        if sp.host.note:
            verification += (f"latency: {sp.host.note}",)
    metrics |= {
        "activation_bytes": Metric(value=float(facts.activation_bytes), unit="B", status=facts.activation_status, note=facts.activation_note),
        "peak_memory_mb": Metric(value=peak_mb, unit="MB", status="estimated", note="model file + activation arena"),
        "op_coverage": measured(coverage.share_on_target, "share", f"ops on {coverage.target}"),
        **dict(facts.metrics),
    }
    if any("unverified" in n for n in facts.notes):  # the converter already says it, in its own words
        verification = ()
    source_notes = tuple(ctx.source.cache.get("source_notes", ())) if conv.format == "onnx" else ()  # how the ONNX graph was normalised
    pools = ctx.source.cache.get("onnx_global_pools", 0) if conv.format == "onnx" else 0
    if pools:
        source_notes += (f"{pools} ReduceMean over the spatial axes quantized as GlobalAveragePool (the same values; ONNX Runtime "
                         "has an int8 kernel for it and runs ReduceMean in float between Q/DQ pairs)",)
    verification += source_notes + facts.notes + tuple(f"quantization: {w}" for w in facts.warnings)
    confidence, confidence_notes = confidence_metrics(ctx, conv, cand, facts, on_host)  # the logits output's marker and cost
    metrics |= confidence
    verification += confidence_notes
    task = ctx.judge.task
    labels = opts.labels or (tuple(str(i) for i in range(ctx.source.num_classes)) if task == "classification" else ())
    recipe = cand.recipe
    fields = {
        "name": ctx.name,
        "version": opts.version,
        "format": conv.format,
        "profile": prof.id,
        "inputs": [s.model_dump() for s in facts.inputs],
        "outputs": [s.model_dump() for s in facts.outputs],
        "labels": list(labels),
        "task": task,
        "preprocessing": (embedded_preprocessing(ctx, conv) or opts.preprocessing).model_dump(),
        "quantization": {
            "recipe": recipe.name,
            "precision": precision_label(recipe.weights, recipe.activations, recipe.options.keep_sensitive),
            "weights": recipe.weights,
            "activations": recipe.activations,
            "io_dtype": facts.inputs[0].dtype,
            "per_channel": recipe.per_channel,
            "calibration_samples": int(len(ctx.calib) if recipe.options.calibration_all else min(len(ctx.calib), opts.calibration_samples)),
            "calibration_sha256": ctx.calib.sha256,
            "max_accuracy_drop": ctx.judge.max_accuracy_drop if (task == "classification" or ctx.judge.metric is not None) else None,
            "min_sqnr_db": ctx.judge.min_sqnr_db,
            "attempts": [a.model_dump() for a in attempts],
            "evaluation_split": ctx.split.to_dict() if ctx.split is not None else None,
        },
        "metrics": {k: v.model_dump() for k, v in metrics.items()},
        "coverage": coverage.model_dump(),
        "verification": list(verification),
        "provenance": {
            "source": ctx.source.path.name,
            "source_sha256": ctx.source.sha256,
            "tool_versions": _versions(),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "host": {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(), "cpus": os.cpu_count()},
        },
    }
    bundle_dir = stage / f"{ctx.name}-{prof.id}-{conv.format}"
    final = cand.path.with_name(f"{ctx.name}{cand.path.suffix}")
    cand.path.rename(final)
    extras = tuple((f, "ONNX Runtime reduced-operator build config") for f in facts.extra_files)
    bundle = write_bundle(bundle_dir, fields, final, golden, signing_key=key, min_top1_agreement=0.9 if cand.outputs is not None else 0.0,
                          atol=_atol(facts, golden), extra_files=extras)
    return ConversionResult(prof.id, conv.format, opts.out / bundle_dir.name, bundle.manifest, coverage, tuple(attempts),
                            tuple(dict.fromkeys(warnings)), tuple(verification))


def _size_reason(metrics: dict[str, Metric]) -> str:
    """Why an INT8 file is larger than the float one, from the byte counts measured on both files."""
    size, float_size = metrics["size_bytes"].value, metrics["float_size_bytes"].value
    w8, wf = metrics.get("int8_weight_bytes"), metrics.get("float_weight_bytes")
    if w8 is None or w8.value is None or size is None or float_size is None:
        return "the weight bytes of this format are not counted here"
    if w8.value > float_size:
        return (f"its int8 weights alone are {w8.value:,.0f} bytes, more than the whole float file's {float_size:,.0f}: the float "
                "graph computes its weights at run time (constant-producing nodes), the quantized one stores them")
    floats = (wf.value or 0.0) if wf is not None else 0.0
    return (f"of its {size:,.0f} bytes, {w8.value:,.0f} are int8 weights, {floats:,.0f} float constants (scales, float layers) "
            f"and {max(size - w8.value - floats, 0.0):,.0f} the rest (int32 biases, graph structure: Q/DQ nodes, names)")
