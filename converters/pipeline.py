"""``edgekit convert``: every (profile, format) job, the recipe search, bundles, the report.

A run is all or nothing: everything is built in a hidden staging directory under ``--out``
and moved into place only when every job succeeded, so a failure leaves nothing behind.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import numpy as np

from converters import FORMATS, get_converter
from converters.base import ConversionResult, Converter, Recipe
from converters.coverage import op_coverage
from converters.dataset import Dataset, load_dataset, split_holdout
from converters.evaluate import Agreement, accuracy, compare, latency_ms
from converters.report import write_reports
from converters.source import SourceModel, load_source
from edgekit import signing
from edgekit.bundle import _size, write_bundle
from edgekit.errors import AccuracyBudgetError, ConversionError, EdgekitError, IncompatibleError, OutputError, UsageError
from edgekit.manifest import Attempt, Metric, Preprocessing
from edgekit.profiles import HardwareProfile, find_profile
from edgekit.runtime import load_model_file

__all__ = ["ConvertOptions", "RunReport", "run_convert"]

GOLDEN_COUNT = 16
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ConvertOptions:
    """Everything ``edgekit convert`` was asked to do."""

    model: Path
    profiles: tuple[str, ...]
    calibration: Path
    out: Path
    formats: tuple[str, ...] = ("all",)
    eval: Path | None = None
    name: str | None = None
    version: str = "1.0.0"
    max_accuracy_drop: float | None = None  # None: 1.0 with labels
    allow_over_budget: bool = False
    calibration_samples: int = 500
    latency_runs: int = 50
    labels: tuple[str, ...] = ()
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    signing_key: Path | None = None
    input_shape: tuple[int, ...] | None = None  # fixes dynamic dims of an ONNX source
    embed_preprocessing: bool = False  # bake the preprocessing into ONNX graphs (raw input)


@dataclass(frozen=True)
class RunReport:
    """The outcome of a whole run."""

    name: str
    version: str
    out: Path
    float_accuracy: float | None
    eval_source: str
    eval_count: int
    max_accuracy_drop: float
    results: tuple[ConversionResult, ...]
    baselines: dict[str, dict[str, float]]

    def to_dict(self) -> dict:
        """JSON-ready report (report.json and --json)."""
        return {
            "name": self.name,
            "version": self.version,
            "out": str(self.out),
            "float_accuracy": self.float_accuracy,
            "evaluated_on": {"source": self.eval_source, "count": self.eval_count},
            "max_accuracy_drop": self.max_accuracy_drop,
            "float_baselines": self.baselines,
            "results": [r.to_dict() for r in self.results],
        }


def _check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".edgekit-write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise OutputError(f"cannot write to --out {out}: {e.strerror or e}", "Choose a directory you can write to.") from None


def _jobs(opts: ConvertOptions) -> list[tuple[HardwareProfile, str]]:
    profiles = [find_profile(p) for p in dict.fromkeys(opts.profiles)]
    wanted = FORMATS if "all" in opts.formats else opts.formats
    for f in wanted:
        if f not in FORMATS:
            raise UsageError(f"unknown format '{f}'", f"Formats: {', '.join(FORMATS)}, all.")
    jobs = []
    for prof in profiles:
        supported = prof.formats.supported()
        for f in wanted:
            if f in supported:
                jobs.append((prof, f))
            elif "all" not in opts.formats:
                raise IncompatibleError(
                    f"profile '{prof.id}' does not take {f} models (it supports: {', '.join(supported) or 'nothing'})",
                    f"Use --format {' or '.join(s for s in supported if s in FORMATS) or 'another'} for this profile, or drop it.",
                )
        if "all" in opts.formats and not any(p is prof for p, _ in jobs):
            raise IncompatibleError(f"profile '{prof.id}' supports none of the formats this edgekit builds ({', '.join(FORMATS)})", "Drop this profile.")
    return jobs


def _jobs_for_source(jobs: list[tuple[HardwareProfile, str]], source: SourceModel, opts: ConvertOptions) -> list[tuple[HardwareProfile, str]]:
    """Drop (with --format all) or refuse (when asked for) formats that cannot be built from this kind of source."""
    kept = []
    for prof, f in jobs:
        if source.kind in get_converter(f).sources:
            kept.append((prof, f))
        elif "all" not in opts.formats:
            raise IncompatibleError(f"--format {f} needs a Keras or SavedModel source; {source.path.name} is {source.kind}",
                                    "Convert from the original Keras/SavedModel, or use --format onnx.")
    if not kept:
        raise IncompatibleError(f"none of the requested profiles takes a format buildable from a {source.kind} model", "Use profiles with an onnx format.")
    return kept


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("edgekit", "tensorflow-cpu", "tensorflow", "keras", "ai-edge-litert", "tf2onnx", "onnx", "onnxruntime", "coremltools", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _measured(value: float | None, unit: str = "", note: str = "") -> Metric:
    return Metric(value=value, unit=unit, status="measured" if value is not None else "not_measurable", note=note)


@dataclass
class _Context:
    opts: ConvertOptions
    source: SourceModel
    calib: Dataset
    evalset: Dataset
    float_out: np.ndarray
    float_accuracy: float | None
    budget: float
    work: Path
    progress: Progress
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)


def _baseline(ctx: _Context, conv: Converter) -> dict[str, float]:
    """Size and host latency of the float model in this format, measured once per run."""
    if conv.format not in ctx.baselines:
        ctx.progress(f"float {conv.format} baseline")
        d = ctx.work / f"float-{conv.format}"
        d.mkdir()
        path = conv.convert_float(ctx.source, d)
        base = {"size_bytes": float(_size(path))}
        if conv.runs_here()[0]:
            lat = latency_ms(load_model_file(path, conv.format), ctx.evalset.x[:1], ctx.opts.latency_runs)
            base["latency_ms_p50"] = float(np.percentile(lat, 50))
        ctx.baselines[conv.format] = base
    return ctx.baselines[conv.format]


def _embedded(ctx: _Context, conv: Converter) -> Preprocessing | None:
    if ctx.opts.embed_preprocessing and conv.format == "onnx":
        return ctx.opts.preprocessing.model_copy(update={"embedded": True})
    return None


def _try_recipe(ctx: _Context, conv: Converter, prof: HardwareProfile, recipe: Recipe, calib_x: np.ndarray, d: Path):
    embedded = _embedded(ctx, conv)
    if embedded is not None:
        recipe = replace(recipe, options=(*recipe.options, ("embed", embedded)))
    path = conv.convert(ctx.source, prof, recipe, calib_x, d)
    if not conv.runs_here()[0]:
        return path, None, None, None
    model = load_model_file(path, conv.format)
    if embedded is not None:
        model.embedded = embedded  # type: ignore[attr-defined]  # the graph takes raw input
    outputs = model.predict(ctx.evalset.x)
    return path, model, outputs, compare(outputs, ctx.float_out, ctx.evalset.y)


def _convert_job(ctx: _Context, prof: HardwareProfile, conv: Converter, stage: Path, key: signing.Ed25519PrivateKey) -> ConversionResult:
    opts = ctx.opts
    warnings = conv.check(ctx.source, prof)
    cap = opts.calibration_samples
    recipes = conv.recipes(prof, len(ctx.calib), cap)
    attempts: list[Attempt] = []
    chosen = None
    best = None
    for i, recipe in enumerate(recipes):
        ctx.progress(f"{prof.id}/{conv.format}: {recipe.name}")
        d = ctx.work / f"{prof.id}-{conv.format}-{i}"
        d.mkdir()
        calib_x = ctx.calib.x if recipe.option("calibration_all") else ctx.calib.x[:cap]
        try:
            path, model, outputs, agr = _try_recipe(ctx, conv, prof, recipe, calib_x, d)
        except ConversionError as e:
            attempts.append(Attempt(recipe=recipe.name, description=recipe.description, error=e.message))
            continue
        if agr is None:  # cannot run here: the first recipe that builds is kept, unmeasured
            attempts.append(Attempt(recipe=recipe.name, description=recipe.description, size_bytes=_size(path), chosen=True))
            return _write_job_bundle(ctx, prof, conv, stage, key, recipe, path, None, None, None, attempts, warnings)
        drop = agr.drop_from(ctx.float_accuracy)
        ok = drop <= ctx.budget + 1e-9
        attempts.append(Attempt(recipe=recipe.name, description=recipe.description, size_bytes=_size(path),
                                accuracy=agr.accuracy, accuracy_drop=drop, agreement=agr.agreement, within_budget=ok))
        candidate = (recipe, path, model, outputs, agr, len(attempts) - 1)
        if best is None or drop < best[4].drop_from(ctx.float_accuracy):
            best = candidate
        if ok:
            chosen = candidate
            break
    if chosen is None:
        if best is None:
            raise ConversionError(f"{prof.id}/{conv.format}: every recipe failed: " + "; ".join(f"{a.recipe}: {a.error}" for a in attempts),
                                  "Run with --debug for the converter log.")
        if not opts.allow_over_budget:
            lines = "\n  ".join(
                f"{a.recipe}: drop {a.accuracy_drop:.2f} pt, agreement {a.agreement:.1f}%" if a.error is None else f"{a.recipe}: failed ({a.error})"
                for a in attempts
            )
            raise AccuracyBudgetError(f"{prof.id}/{conv.format}: no recipe kept the accuracy drop within {ctx.budget:g} pt:\n  {lines}")
        chosen = best
        warnings.append(f"over the accuracy budget of {ctx.budget:g} pt (--allow-over-budget): kept the best attempt, {chosen[0].name}")
    recipe, path, model, outputs, agr, idx = chosen
    attempts[idx] = attempts[idx].model_copy(update={"chosen": True})
    return _write_job_bundle(ctx, prof, conv, stage, key, recipe, path, model, outputs, agr, attempts, warnings)


def _write_job_bundle(ctx, prof, conv, stage, key, recipe, path, model, outputs, agr: Agreement | None, attempts, warnings) -> ConversionResult:
    opts = ctx.opts
    facts = conv.inspect(path, prof)
    warnings = [*warnings, *facts.warnings]
    coverage = op_coverage(facts.ops, prof, conv.format, facts.dtype_violations)
    if facts.dtype_violations:
        raise IncompatibleError(f"{prof.id}/{conv.format}: ops outside full-integer: {'; '.join(facts.dtype_violations[:5])}",
                                "The profile requires full-integer models; this model has ops without int8 kernels.")
    size = _size(path)
    peak_mb = (size + facts.activation_bytes) / 1e6
    if peak_mb > prof.memory.model_budget_mb:
        raise IncompatibleError(f"{prof.id}/{conv.format}: model {size/1e6:.2f} MB + activations {facts.activation_bytes/1e6:.2f} MB "
                                f"exceed the profile's model budget of {prof.memory.model_budget_mb:g} MB", "Use a smaller model or another profile.")
    base = _baseline(ctx, conv)
    runs, why_not = conv.runs_here()
    p50 = float(np.percentile(latency_ms(model, ctx.evalset.x[:1], opts.latency_runs), 50)) if model is not None else None
    out_spec = facts.outputs[0]
    step = out_spec.quantization.scale if out_spec.quantization else 1e-3
    g = min(GOLDEN_COUNT, len(ctx.evalset))
    golden = {"x": ctx.evalset.x[:g], "y_float": ctx.float_out[:g]}
    if outputs is not None:
        golden["y_host"] = outputs[:g].astype(np.float32)
    on_host = f"on this conversion host ({model.runtime}+{model.delegate})" if model is not None else ""
    if agr is None:
        metrics = _unmeasured_metrics(ctx, size, base, why_not)
        verification = (f"numerics unverified on this host: {why_not}",)
    else:
        metrics = _measured_metrics(ctx, agr, size, base, p50, on_host, opts)
        if metrics["size_ratio"].value > 1:
            warnings.append(f"the quantized model is {metrics['size_ratio'].value:.2f}x the float model's size (quantization "
                            "parameters dominate on very small models)")
        if metrics["latency_ratio"].value > 1:
            warnings.append(f"on this host the quantized model is {metrics['latency_ratio'].value:.2f}x slower than float "
                            "(per-call overhead dominates on very small models; the device may differ)")
        verification = (f"accuracy, agreement and latency measured {on_host}",)
    metrics.update({
        "activation_bytes": Metric(value=float(facts.activation_bytes), unit="B", status="estimated", note="sum of activation tensors, no buffer reuse: an upper bound"),
        "peak_memory_mb": Metric(value=peak_mb, unit="MB", status="estimated", note="model file + activation upper bound"),
        "op_coverage": _measured(coverage.share_on_target, "share", f"ops on {coverage.target}"),
        **dict(facts.metrics),
    })
    if any("unverified" in n for n in facts.notes):  # the converter already says it, in its own words
        verification = ()
    verification += facts.notes + tuple(f"quantization: {w}" for w in facts.warnings)
    labels = opts.labels or tuple(str(i) for i in range(ctx.source.num_classes))
    return _bundle(ctx, prof, conv, stage, key, recipe, path, facts, coverage, metrics, labels, golden, step, attempts, warnings,
                   verification, outputs is not None)


def _measured_metrics(ctx: _Context, agr: Agreement, size: int, base: dict, p50: float, on_host: str, opts: ConvertOptions) -> dict[str, Metric]:
    return {
        "float_accuracy": _measured(ctx.float_accuracy, "%", "float source model"),
        "int8_accuracy": _measured(agr.accuracy, "%", "this model, " + on_host),
        "accuracy_drop": Metric(value=agr.drop_from(ctx.float_accuracy), unit="pt", status="measured",
                                note="float minus int8 accuracy" if agr.accuracy is not None else "disagreement with float (bounds the drop; no labels)"),
        "agreement": _measured(agr.agreement, "%", "top-1 equal to the float model's"),
        "max_abs_error": _measured(agr.max_abs_error, "", "largest output difference from the float model"),
        "size_bytes": _measured(float(size), "B"),
        "float_size_bytes": _measured(base["size_bytes"], "B", "float model in the same format"),
        "size_ratio": _measured(size / base["size_bytes"], "x", "int8 / float"),
        "host_latency_ms_p50": _measured(p50, "ms", f"batch 1, {opts.latency_runs} runs, {on_host}"),
        "float_host_latency_ms_p50": _measured(base["latency_ms_p50"], "ms", "float model, same conditions"),
        "latency_ratio": _measured(p50 / base["latency_ms_p50"], "x", "int8 / float on this host"),
    }


def _unmeasured_metrics(ctx: _Context, size: int, base: dict, why: str) -> dict[str, Metric]:
    na = lambda unit="": Metric(value=None, unit=unit, status="not_measurable", note=why)  # noqa: E731
    return {
        "float_accuracy": _measured(ctx.float_accuracy, "%", "float source model"),
        "int8_accuracy": na("%"),
        "accuracy_drop": na("pt"),
        "agreement": na("%"),
        "size_bytes": _measured(float(size), "B"),
        "float_size_bytes": _measured(base["size_bytes"], "B", "float model in the same format"),
        "size_ratio": _measured(size / base["size_bytes"], "x", "quantized / float"),
        "host_latency_ms_p50": na("ms"),
        "latency_ratio": na("x"),
    }


def _bundle(ctx, prof, conv, stage, key, recipe, path, facts, coverage, metrics, labels, golden, step, attempts, warnings, verification,
            measured: bool) -> ConversionResult:
    opts = ctx.opts
    fields = {
        "name": _name(opts),
        "version": opts.version,
        "format": conv.format,
        "profile": prof.id,
        "inputs": [s.model_dump() for s in facts.inputs],
        "outputs": [s.model_dump() for s in facts.outputs],
        "labels": list(labels),
        "preprocessing": (_embedded(ctx, conv) or opts.preprocessing).model_dump(),
        "quantization": {
            "recipe": recipe.name,
            "weights": recipe.weights,
            "activations": recipe.activations,
            "io_dtype": facts.inputs[0].dtype,
            "per_channel": recipe.per_channel,
            "calibration_samples": int(len(ctx.calib) if recipe.option("calibration_all") else min(len(ctx.calib), opts.calibration_samples)),
            "calibration_sha256": ctx.calib.sha256,
            "max_accuracy_drop": ctx.budget,
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
    bundle_dir = stage / f"{_name(opts)}-{prof.id}-{conv.format}"
    final = path.with_name(f"{_name(opts)}{path.suffix}")
    path.rename(final)
    extras = tuple((f, "ONNX Runtime reduced-operator build config") for f in facts.extra_files)
    bundle = write_bundle(bundle_dir, fields, final, golden, signing_key=key, min_top1_agreement=0.9 if measured else 0.0,
                          atol=float(3 * step), extra_files=extras)
    return ConversionResult(prof.id, conv.format, opts.out / bundle_dir.name, bundle.manifest, coverage, tuple(attempts),
                            tuple(dict.fromkeys(warnings)), tuple(verification))


def _name(opts: ConvertOptions) -> str:
    return opts.name or opts.model.name.split(".")[0]


def _install(stage: Path, out: Path, trash: Path) -> None:
    """Move staged bundles into ``out``, replacing same-named ones, each with one rename."""
    trash.mkdir(exist_ok=True)
    for d in sorted(stage.iterdir()):
        dest = out / d.name
        if dest.exists():
            os.replace(dest, trash / d.name)
        os.replace(d, dest)


def run_convert(opts: ConvertOptions, progress: Progress = lambda _msg: None) -> RunReport:
    """Convert for every requested (profile, format); nothing is written unless all succeed."""
    jobs = _jobs(opts)  # unknown profiles and unsupported formats fail before any work
    if opts.embed_preprocessing and opts.preprocessing.raw_dtype == "float32" and opts.preprocessing.scale == 1.0:
        raise UsageError("--embed-preprocessing needs a --preprocessing spec to embed",
                         "Example: --preprocessing scale=0.00392157,raw_dtype=uint8,layout=NHWC --embed-preprocessing")
    _check_out_dir(opts.out)
    key = signing.load_or_create_key(opts.signing_key)
    work = Path(tempfile.mkdtemp(dir=opts.out, prefix=".edgekit-tmp-"))
    try:
        progress("loading the float model")
        source = load_source(opts.model, work, opts.input_shape)
        jobs = _jobs_for_source(jobs, source, opts)
        calib = load_dataset(opts.calibration, role="calibration", input_shape=source.input_shape)
        if opts.labels and len(opts.labels) != source.num_classes:
            raise UsageError(f"--labels gives {len(opts.labels)} names but the model has {source.num_classes} outputs", "Give one label per line, one per class.")
        if opts.eval is not None:
            evalset = load_dataset(opts.eval, role="eval", input_shape=source.input_shape, num_classes=source.num_classes, need_labels=True)
        else:
            calib, evalset = split_holdout(calib)
        convs = {f: get_converter(f) for f in dict.fromkeys(f for _, f in jobs)}
        for prof, f in jobs:  # incompatibilities surface before the slow part
            convs[f].check(source, prof)
        progress("running the float model on the evaluation data")
        float_out = source.predict(evalset.x)
        float_acc = accuracy(float_out, evalset.y)
        budget = opts.max_accuracy_drop if opts.max_accuracy_drop is not None else 1.0
        ctx = _Context(opts, source, calib, evalset, float_out, float_acc, budget, work, progress)
        stage = work / "stage"
        stage.mkdir()
        results = tuple(_convert_job(ctx, prof, convs[f], stage, key) for prof, f in jobs)
        report = RunReport(_name(opts), opts.version, opts.out, float_acc, evalset.source if opts.eval else f"{calib.source} (held-out 20%)",
                           len(evalset), budget, results, ctx.baselines)
        write_reports(report, work / "stage")
        _install(stage, opts.out, work / "trash")
        return report
    except EdgekitError:
        raise
    except OSError as e:
        raise OutputError(f"writing under {opts.out} failed: {e}", "Check free space and permissions.") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
