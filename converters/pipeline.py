"""``edgekit convert``: plan every (profile, format) job, search recipes, validate, package, install.

Stages: **plan** (options, profiles, formats, the source, the data, the task: every refusal
happens here, before any slow work), **search** (per job, :mod:`converters.search`),
**package** (:mod:`converters.package`), **install**. A run is all or nothing: everything is
built in a hidden staging directory under ``--out`` and moved into place only when every job
succeeded; a failure (or SIGINT/SIGTERM) removes the staging directory, and ``--out`` itself
when the run created it, and names every job that failed.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters import FORMATS, get_converter
from converters.base import ConversionResult, Converter
from converters.confidence import CONFIDENCE_MODES, with_confidence_output
from converters.dataset import Dataset, load_dataset, split_holdout
from converters.evaluate import DEFAULT_MIN_SQNR_DB, TASKS, Judge, MetricHook, accuracy, check_task, class_axis, infer_task, input_independence_warnings, latency_ms, load_metric, score_metric
from converters.memory import MemoryPlan, default_max_memory_mb
from converters.package import embedded_preprocessing, package_candidate
from converters.report import write_reports
from converters.search import align, search_recipes, split_judges
from converters.selection import EvalSplit
from converters.speed import TIMING_THREADS
from converters.source import Feeds, SourceModel, load_source
from edgekit import signing
from edgekit.bundle import _size
from edgekit.errors import ConversionError, EdgekitError, IncompatibleError, OutputError, UsageError
from edgekit.manifest import Preprocessing
from edgekit.profiles import HardwareProfile, find_profile
from edgekit.runtime import LocalModel, load_model_file

__all__ = ["ConvertOptions", "RunContext", "RunReport", "run_convert"]

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
    max_accuracy_drop: float | None = None  # None: 1.0 (points, or metric units with --metric)
    allow_over_budget: bool = False
    calibration_samples: int = 500
    latency_runs: int = 50
    labels: tuple[str, ...] = ()
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    signing_key: Path | None = None
    input_shape: tuple[int, ...] | None = None  # the only input's shape (ONNX/PyTorch sources); see input_shapes
    embed_preprocessing: bool = False  # bake the preprocessing into ONNX graphs (raw input)
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (input name, shape) pins for dynamic dims
    task: str | None = None  # None: inferred from the outputs
    min_sqnr_db: float = DEFAULT_MIN_SQNR_DB
    metric: str | MetricHook | None = None  # "module:function" or a callable(outputs, data) -> float
    max_memory_mb: float | None = None  # None: half this machine's RAM
    source_model: Any = field(default=None, compare=False, repr=False)  # a prepared SourceModel (Python API, e.g. a torch module)
    confidence_output: str = "auto"  # auto | logits | none: keep a classifier's pre-softmax logits as a second output (converters.confidence)

    @property
    def metric_name(self) -> str:
        m = self.metric
        return m if isinstance(m, str) else getattr(m, "__qualname__", "hook")


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
    task: str = "classification"
    task_reason: str = ""
    min_sqnr_db: float = DEFAULT_MIN_SQNR_DB
    warnings: tuple[str, ...] = ()
    confidence_output: dict = field(default_factory=dict)
    evaluation_split: dict[str, Any] = field(default_factory=dict)  # converters.selection.EvalSplit.to_dict()

    def to_dict(self) -> dict:
        """JSON-ready report (report.json and --json)."""
        return {
            "name": self.name,
            "version": self.version,
            "out": str(self.out),
            "task": self.task,
            "task_inferred": self.task_reason,
            "float_accuracy": self.float_accuracy,
            "evaluated_on": {"source": self.eval_source, "count": self.eval_count},
            "evaluation_split": self.evaluation_split,
            "max_accuracy_drop": self.max_accuracy_drop,
            "min_sqnr_db": self.min_sqnr_db,
            "float_baselines": self.baselines,
            "warnings": list(self.warnings),
            "confidence_output": self.confidence_output,
            "results": [r.to_dict() for r in self.results],
        }


@dataclass
class RunContext:
    """What every job of one run shares."""

    opts: ConvertOptions
    source: SourceModel
    calib: Dataset
    evalset: Dataset
    judge: Judge
    work: Path
    progress: Progress
    memory: MemoryPlan
    name: str
    batch_size: int = 32
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    split: EvalSplit | None = None  # selection vs test examples (converters.selection); set by _run
    selection_judge: Judge | None = None  # the judge on the selection split (decides the recipe)
    test_judge: Judge | None = None  # the judge on the test split (the reported figures)
    float_paths: dict[str, Path] = field(default_factory=dict)  # format -> the float baseline model file
    timing_models: dict[tuple, LocalModel] = field(default_factory=dict)  # float models loaded for timing (converters.speed)

    def check_interrupted(self) -> None:
        """Raise KeyboardInterrupt when SIGINT/SIGTERM arrived, even if a native converter swallowed it."""
        if INTERRUPTED.is_set():
            raise KeyboardInterrupt("interrupted")

    def model_feeds(self, model: LocalModel, feeds: Mapping[str, np.ndarray]) -> Feeds:
        """Feeds keyed by source input name, re-keyed by the model's input names."""
        return {m_name: feeds[s_name] for m_name, s_name in align(model.inputs, self.source.inputs, "input").items()}

    def baseline(self, conv: Converter) -> dict[str, float]:
        """Size and host latency of the float model in this format, measured once per run."""
        if conv.format not in self.baselines:
            self.progress(f"float {conv.format} baseline")
            d = self.work / f"float-{conv.format}"
            d.mkdir()
            path = conv.convert_float(self.source, d)
            self.float_paths[conv.format] = path
            base = {"size_bytes": float(_size(path))}
            if conv.runs_here()[0]:
                model = load_model_file(path, conv.format, num_threads=TIMING_THREADS)
                lat = latency_ms(model, self.model_feeds(model, self.evalset.first), self.opts.latency_runs)
                base["latency_ms_p50"] = float(np.percentile(lat, 50))
            act = conv.activation_bytes(path)
            if act is not None:
                base["float_activation_bytes"] = float(act)
            self.baselines[conv.format] = base
        return self.baselines[conv.format]


# --- plan -------------------------------------------------------------------------------------

def _check_options(opts: ConvertOptions) -> None:
    """Refuse option values that make no sense, before anything is touched."""
    if opts.max_accuracy_drop is not None and not math.isfinite(opts.max_accuracy_drop):
        raise UsageError(f"--max-accuracy-drop must be a finite number, not {opts.max_accuracy_drop}", "Give the budget in accuracy points, e.g. 0.5.")
    if not math.isfinite(opts.min_sqnr_db):
        raise UsageError(f"--min-sqnr-db must be a finite number of dB, not {opts.min_sqnr_db}", f"The default is {DEFAULT_MIN_SQNR_DB:g} dB.")
    if opts.max_memory_mb is not None and not (math.isfinite(opts.max_memory_mb) and opts.max_memory_mb > 0):
        raise UsageError(f"--max-memory must be a finite number of MB > 0, not {opts.max_memory_mb}", "Example: --max-memory 4000")
    if opts.confidence_output not in CONFIDENCE_MODES:
        raise UsageError(f"--confidence-output '{opts.confidence_output}' is not one of {', '.join(CONFIDENCE_MODES)}",
                         "auto keeps a classifier's logits beside its softmax when edgekit finds the softmax; none keeps the outputs as they are.")
    if opts.task is not None and opts.task not in TASKS:
        raise UsageError(f"--task '{opts.task}' is not one of {', '.join(TASKS)}", "Omit --task to let edgekit infer it from the outputs.")
    if opts.embed_preprocessing and opts.preprocessing.raw_dtype == "float32" and opts.preprocessing.scale == 1.0:
        raise UsageError("--embed-preprocessing needs a --preprocessing spec to embed",
                         "Example: --preprocessing scale=0.00392157,raw_dtype=uint8,layout=NHWC --embed-preprocessing")


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
    """Keep the (profile, format) pairs this source can make; a profile left with none is an error, before any work."""
    why = {f: get_converter(f).unavailable_for(source) for f in dict.fromkeys(f for _, f in jobs)}
    kept = [(p, f) for p, f in jobs if why[f] is None]
    dropped = [(p, f) for p, f in jobs if why[f] is not None]
    if dropped and "all" not in opts.formats:
        p, f = dropped[0]
        raise IncompatibleError(f"--format {f} cannot be made from {source.path.name}: {why[f]}",
                                "Convert from the original model, or use --format onnx.")
    orphaned = [p.id for p in dict.fromkeys(p for p, _ in jobs) if not any(q is p for q, _ in kept)]
    if orphaned:
        formats = {p.id: [f for q, f in jobs if q is p] for p in dict.fromkeys(p for p, _ in jobs)}
        raise IncompatibleError(
            f"no bundle can be made from {source.path.name} for: "
            + "; ".join(f"profile '{pid}' ({'; '.join(str(why[f]) for f in formats[pid])})" for pid in orphaned),
            "Drop those profiles, or convert from a source their formats are built from (e.g. the Keras model for tflite).")
    return kept


def _dropped_formats(jobs: list[tuple[HardwareProfile, str]], kept: list[tuple[HardwareProfile, str]], source: SourceModel) -> list[str]:
    """What --format all left out for this source, said out loud."""
    return [f"{p.id}: no {f} bundle: {get_converter(f).unavailable_for(source)}" for p, f in jobs if (p, f) not in kept]


def _input_shapes(opts: ConvertOptions) -> dict[str, tuple[int, ...]]:
    shapes = dict(opts.input_shapes)
    if opts.input_shape is not None:
        shapes.setdefault("", opts.input_shape)
    return shapes


def _judge(opts: ConvertOptions, source: SourceModel, evalset: Dataset, progress: Progress, task: str, why: str) -> tuple[Judge, str, list[str]]:
    hook = load_metric(opts.metric) if isinstance(opts.metric, str) else opts.metric
    progress("running the float model on the evaluation data")
    float_out = source.run(evalset.x)
    axis = class_axis(source.outputs[0].shape) if task == "classification" else None
    float_acc = accuracy(float_out[source.output_names[0]], evalset.y, axis) if axis is not None else None
    data = {**evalset.x, **evalset.extra, **({"y": evalset.y} if evalset.y is not None else {})}
    float_metric = score_metric(hook, float_out, data, "the float model's outputs") if hook is not None else None
    budget = opts.max_accuracy_drop if opts.max_accuracy_drop is not None else 1.0
    judge = Judge(task, source.output_names, axis, float_out, evalset.y, float_acc, budget, opts.min_sqnr_db, hook, float_metric, data)
    return judge, why, input_independence_warnings(judge)


def _name(opts: ConvertOptions) -> str:
    return opts.name or opts.model.name.split(".")[0]


# --- install and clean-up -----------------------------------------------------------------------

def _install(stage: Path, out: Path, trash: Path) -> None:
    """Move staged bundles into ``out``, replacing same-named ones, each with one rename."""
    trash.mkdir(exist_ok=True)
    for d in sorted(stage.iterdir()):
        dest = out / d.name
        if dest.exists():
            os.replace(dest, trash / d.name)
        os.replace(d, dest)


def _make_out(out: Path) -> list[Path]:
    """Create ``out`` (and missing parents); the directories created, deepest first, to remove on failure."""
    created: list[Path] = []
    p = out
    while not p.exists():
        created.append(p)
        if p.parent == p:
            break
        p = p.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".edgekit-write-test-", delete=True)
        probe.close()
    except OSError as e:
        _remove_created(created)
        raise OutputError(f"cannot write to --out {out}: {e.strerror or e}", "Choose a directory you can write to.") from None
    return created


def _remove_created(created: list[Path]) -> None:
    for d in created:  # deepest first; only directories this run made, and only if empty
        try:
            d.rmdir()
        except OSError:
            break


INTERRUPTED = threading.Event()
"""Set by SIGINT/SIGTERM during a run: native converters may swallow the KeyboardInterrupt, so the search checks it too."""


@contextmanager
def _interruptible(cleanup: list[Callable[[], None]]) -> Iterator[None]:
    """SIGINT/SIGTERM: clean up at once, then raise KeyboardInterrupt; main thread only.

    The clean-up (``cleanup``'s callables: remove the staging directory, and ``--out`` when this
    run created it) runs inside the handler, because the KeyboardInterrupt can land where Python
    ignores it (seen: in a TensorFlow ``__del__``) or inside a converter that turns it into its own
    error. INTERRUPTED stops the search at its next step, and if the process is still running
    10 s after the signal it exits with 128 + the signal number.
    """
    INTERRUPTED.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    watchdogs: list[threading.Timer] = []

    def stop(signum: int, _frame: object) -> None:
        first = not INTERRUPTED.is_set()
        INTERRUPTED.set()
        if first:
            for fn in cleanup:
                fn()
            watchdog = threading.Timer(10.0, os._exit, (128 + signum,))
            watchdog.daemon = True
            watchdog.start()
            watchdogs.append(watchdog)
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for w in watchdogs:  # the run ended by itself: a Python caller keeps its process
            w.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- run ----------------------------------------------------------------------------------------

def run_convert(opts: ConvertOptions, progress: Progress = lambda _msg: None) -> RunReport:
    """Convert for every requested (profile, format); nothing is written unless all succeed."""
    _check_options(opts)
    jobs = _jobs(opts)  # unknown profiles and unsupported formats fail before any work
    cleanup: list[Callable[[], None]] = []
    with _interruptible(cleanup):
        created = _make_out(opts.out)
        work: Path | None = None
        ok = False
        cleanup.append(lambda: _remove_created(created) if not ok else None)
        caller_froze = gc.get_freeze_count() > 0  # a caller's own gc.freeze() is left as it is
        try:
            key = signing.load_or_create_key(opts.signing_key)
            work = Path(tempfile.mkdtemp(dir=opts.out, prefix=".edgekit-tmp-"))
            cleanup.insert(0, lambda: shutil.rmtree(work, ignore_errors=True))
            report = _run(opts, jobs, key, work, progress, freeze=not caller_froze)
            ok = True
            return report
        except EdgekitError:
            if INTERRUPTED.is_set():
                raise KeyboardInterrupt("interrupted") from None
            raise
        except OSError as e:
            if INTERRUPTED.is_set():
                raise KeyboardInterrupt("interrupted") from None
            raise OutputError(f"writing under {opts.out} failed: {e}", "Check free space and permissions.") from e
        except MemoryError:
            raise ConversionError("the conversion ran out of memory", "Lower --calibration-samples or --max-memory, or use a machine with more RAM.") from None
        finally:
            if not caller_froze:
                gc.unfreeze()  # what _run froze is collectable again once the run is over
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
            if not ok:
                _remove_created(created)


def _freeze_long_lived() -> None:
    """Move what is alive now (TensorFlow's modules, the source model, the data: alive until the run ends) out of the collector's view.

    The search collects before every recipe (``converters.memory.release_freed_memory``) and tf2onnx's export
    before every optimizer pass; with TensorFlow imported each full collection walked millions of long-lived
    objects (0.15-0.3 s each here, 2-3 s of a small model's run). Frozen, they are skipped; garbage made
    after this point is collected as before, and ``run_convert`` unfreezes them at the end of the run.
    """
    gc.collect()
    gc.freeze()


def _run(opts: ConvertOptions, jobs: list[tuple[HardwareProfile, str]], key: signing.Ed25519PrivateKey, work: Path, progress: Progress,
         freeze: bool = False) -> RunReport:
    progress("loading the float model")
    source = opts.source_model if opts.source_model is not None else load_source(opts.model, work, _input_shapes(opts))
    if opts.source_model is not None:
        source.workdir = work
    task, why = (opts.task, "given with --task") if opts.task else infer_task(source.outputs)
    check_task(task, source.outputs)  # on the model's own outputs, before the confidence output joins them
    source, confidence = with_confidence_output(source, opts.confidence_output, task)
    source.cache["confidence_plan"] = confidence
    if confidence.added:
        progress(f"confidence output: {confidence.note}")
    kept = _jobs_for_source(jobs, source, opts)
    dropped = _dropped_formats(jobs, kept, source)
    jobs = kept
    if opts.embed_preprocessing and len(source.inputs) != 1:
        raise UsageError(f"--embed-preprocessing works on single-input models; this one has {len(source.inputs)} inputs", "Drop --embed-preprocessing.")
    calib = load_dataset(opts.calibration, role="calibration", inputs=source.inputs)
    if opts.labels and len(opts.labels) != source.num_classes:
        raise UsageError(f"--labels gives {len(opts.labels)} names but the model has {source.num_classes} outputs", "Give one label per line, one per class.")
    if opts.eval is not None:
        is_cls = task == "classification" and opts.metric is None
        evalset = load_dataset(opts.eval, role="eval", inputs=source.inputs, num_classes=source.num_classes if is_cls else None, need_labels=is_cls)
    else:
        calib, evalset = split_holdout(calib)
    convs = {f: get_converter(f) for f in dict.fromkeys(f for _, f in jobs)}
    for prof, f in jobs:  # incompatibilities surface before the slow part
        convs[f].check(source, prof)
    judge, why, run_warnings = _judge(opts, source, evalset, progress, task, why)
    if freeze:
        _freeze_long_lived()
    run_warnings = [*dropped, *run_warnings]
    memory = MemoryPlan(opts.max_memory_mb or default_max_memory_mb())
    source.cache["calibration_chunk"] = memory.chunk(source)
    ctx = RunContext(opts, source, calib, evalset, judge, work, progress, memory, _name(opts))
    ctx.split, ctx.selection_judge, ctx.test_judge = split_judges(judge)
    stage = work / "stage"
    stage.mkdir()
    results: list[ConversionResult] = []
    failures: list[tuple[str, EdgekitError]] = []
    for prof, f in jobs:  # every job runs, so one failure report names them all
        conv = convs[f]
        if INTERRUPTED.is_set():
            raise KeyboardInterrupt("interrupted")
        try:
            cand, attempts, warnings = search_recipes(ctx, prof, conv, embedded_preprocessing(ctx, conv))
            attempts[cand.attempt_index] = attempts[cand.attempt_index].model_copy(update={"chosen": True})
            results.append(package_candidate(ctx, prof, conv, stage, key, cand, attempts, [*run_warnings, *warnings]))
        except (ConversionError, IncompatibleError) as e:
            failures.append((f"{prof.id}/{f}: {e.message}" if not e.message.startswith(f"{prof.id}/") else e.message, e))
            progress(f"{prof.id}/{f}: failed")
    if failures:
        if len(failures) == 1 and len(jobs) == 1:
            raise failures[0][1]
        raise ConversionError(f"{len(failures)} of {len(jobs)} (profile, format) jobs failed, so nothing was written:\n  "
                              + "\n  ".join(m for m, _ in failures),
                              "Fix or drop the failing profiles/formats; a run installs every bundle or none.")
    report = RunReport(ctx.name, opts.version, opts.out, judge.float_accuracy, evalset.source if opts.eval else f"{calib.source} (held-out 20%)",
                       len(evalset), judge.max_accuracy_drop, tuple(results), ctx.baselines, judge.task, why, judge.min_sqnr_db, tuple(run_warnings),
                       confidence.to_dict(), evaluation_split=ctx.split.to_dict())
    write_reports(report, stage)
    _install(stage, opts.out, work / "trash")
    return report
