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
from converters.evaluate import Evaluation, latency_ms
from converters.search import Candidate, align
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


def _evaluation_metrics(ctx: RunContext, ev: Evaluation, on_host: str) -> dict[str, Metric]:
    j = ctx.judge
    out: dict[str, Metric] = {"float_accuracy": measured(j.float_accuracy, "%", "float source model")}
    if ev.task == "classification":
        out |= {
            "int8_accuracy": measured(ev.accuracy, "%", "this model, " + on_host),
            "accuracy_drop": Metric(value=ev.drop if j.metric is None else None, unit="pt", status="measured" if j.metric is None else "not_measurable",
                                    note="float minus int8 accuracy" if ev.accuracy is not None else "disagreement with float (bounds the drop; no labels)"),
            "agreement": measured(ev.agreement, "%", "top-1 (over the class axis) equal to the float model's"),
        }
    else:
        out |= {"int8_accuracy": measured(None, "%", f"task {ev.task}: see the per-output fidelity"),
                "accuracy_drop": measured(None, "pt", f"task {ev.task}: the budget is SQNR >= {j.min_sqnr_db:g} dB" if j.metric is None else "see metric"),
                "agreement": measured(None, "%", f"task {ev.task}: no top-1")}
    if j.metric is not None:
        out["metric"] = measured(ev.metric, "", f"--metric {ctx.opts.metric_name}, {on_host}")
        out["float_metric"] = measured(j.float_metric, "", "float source model")
        out["metric_drop"] = measured(ev.drop, "", "float minus this model")
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
        feeds_one = {name: v for name, v in ctx.model_feeds(cand.model, ctx.evalset.first).items()}
        p50 = float(np.percentile(latency_ms(model, feeds_one, opts.latency_runs), 50))
        metrics = _evaluation_metrics(ctx, cand.evaluation, on_host)
        metrics |= {
            "size_bytes": measured(float(size), "B"),
            "float_size_bytes": measured(base["size_bytes"], "B", "float model in the same format"),
            "size_ratio": measured(size / base["size_bytes"], "x", "int8 / float"),
            "host_latency_ms_p50": measured(p50, "ms", f"batch 1, {opts.latency_runs} runs, {on_host}"),
            "float_host_latency_ms_p50": measured(base["latency_ms_p50"], "ms", "float model, same conditions"),
            "latency_ratio": measured(p50 / base["latency_ms_p50"], "x", "int8 / float on this host"),
        }
        if metrics["size_ratio"].value > 1:
            warnings.append(f"the quantized model is {metrics['size_ratio'].value:.2f}x the float model's size (quantization "
                            "parameters dominate on very small models)")
        if metrics["latency_ratio"].value > 1:
            warnings.append(f"on this host the quantized model is {metrics['latency_ratio'].value:.2f}x slower than float "
                            "(per-call overhead dominates on very small models; the device may differ)")
        verification = (f"{ctx.judge.budget_text} checked {on_host} on {len(ctx.evalset)} examples; latency measured there too",)
    metrics |= {
        "activation_bytes": Metric(value=float(facts.activation_bytes), unit="B", status=facts.activation_status, note=facts.activation_note),
        "peak_memory_mb": Metric(value=peak_mb, unit="MB", status="estimated", note="model file + activation arena"),
        "op_coverage": measured(coverage.share_on_target, "share", f"ops on {coverage.target}"),
        **dict(facts.metrics),
    }
    if any("unverified" in n for n in facts.notes):  # the converter already says it, in its own words
        verification = ()
    source_notes = tuple(ctx.source.cache.get("source_notes", ())) if conv.format == "onnx" else ()  # how the ONNX graph was normalised
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
