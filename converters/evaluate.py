"""Numbers measured on this host: what the task needs (accuracy, per-output fidelity, a user metric), latency.

Fidelity of a quantized output q against the float output f, over every element:
SQNR = 10 log10(sum f^2 / sum (q - f)^2) dB, cosine similarity, and max |q - f| / max |f|.
The default budget, 20 dB (``DEFAULT_MIN_SQNR_DB``), means the quantization noise carries
1% of the signal's power; int8 with well-chosen ranges gives 30-40 dB on the outputs of
typical CNNs, and classification top-1 rarely moves above 15-20 dB.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from converters.selection import paired_drop_interval, wilson_interval
from edgekit.errors import IncompatibleError, InputError, UsageError
from edgekit.manifest import TensorSpec
from edgekit.runtime import LocalModel

__all__ = ["DEFAULT_MIN_SQNR_DB", "TASKS", "Evaluation", "Fidelity", "MetricHook", "Judge", "accuracy", "check_task", "class_axis", "evaluate", "fidelity", "infer_task",
           "input_independence_warnings", "latency_ms", "load_metric", "score_metric"]

DEFAULT_MIN_SQNR_DB = 20.0
TASKS = ("classification", "detection", "regression", "embedding", "generic")
MetricHook = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], float]


@dataclass(frozen=True)
class Fidelity:
    """One output of the quantized model against the float model's, on the same inputs."""

    sqnr_db: float
    cosine: float
    max_rel_error: float
    max_abs_error: float

    def to_dict(self) -> dict:
        return {"sqnr_db": self.sqnr_db, "cosine": self.cosine, "max_rel_error": self.max_rel_error, "max_abs_error": self.max_abs_error}


def fidelity(q: np.ndarray, f: np.ndarray) -> Fidelity:
    """SQNR (dB, capped at 200 for identical outputs), cosine similarity, max relative and absolute error."""
    q64, f64 = np.asarray(q, np.float64).ravel(), np.asarray(f, np.float64).ravel()
    err = q64 - f64
    signal, noise = float(f64 @ f64), float(err @ err)
    sqnr = 200.0 if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -200.0)
    nq, nf = float(np.linalg.norm(q64)), float(np.linalg.norm(f64))
    cosine = 1.0 if nq == nf == 0 else (float(q64 @ f64) / (nq * nf) if nq and nf else 0.0)
    peak = float(np.abs(f64).max()) if f64.size else 0.0
    max_abs = float(np.abs(err).max()) if err.size else 0.0
    return Fidelity(min(sqnr, 200.0), cosine, max_abs / peak if peak else (0.0 if max_abs == 0 else math.inf), max_abs)


def class_axis(shape: tuple[int, ...]) -> int | None:
    """The class axis of a classifier output: the one axis after the batch with more than one element.

    ``(N, 1000)`` and ``(N, 1000, 1, 1)`` give 1; a detector's ``(N, 22, 2100)`` gives None.
    """
    axes = [i for i, d in enumerate(shape) if i > 0 and d != 1]
    return axes[0] if len(axes) == 1 and shape[axes[0]] >= 2 else None


def infer_task(outputs: tuple[TensorSpec, ...]) -> tuple[str, str]:
    """(task, why): classification for one output with one class axis, else generic (per-output fidelity)."""
    if len(outputs) == 1 and class_axis(outputs[0].shape) is not None and np.dtype(outputs[0].dtype).kind == "f":
        return "classification", f"one output shaped {outputs[0].shape} with a single class axis"
    if len(outputs) > 1:
        return "generic", f"{len(outputs)} outputs: each is checked for fidelity against the float model"
    return "generic", f"output shaped {outputs[0].shape} has no single class axis: checked for fidelity against the float model"


def check_task(task: str, outputs: tuple[TensorSpec, ...]) -> None:
    """Refuse a --task the outputs cannot support (a detector called a classifier) before any work."""
    if task not in TASKS:
        raise UsageError(f"--task '{task}' is not one of {', '.join(TASKS)}", "Omit --task to let edgekit infer it.")
    if task == "classification":
        if len(outputs) != 1 or class_axis(outputs[0].shape) is None:
            shapes = ", ".join(f"{s.name} {s.shape}" for s in outputs)
            raise IncompatibleError(f"--task classification needs one output with a single class axis; this model has {shapes}",
                                    "Use --task detection/regression/embedding/generic (per-output fidelity), or --metric module:function.")


def load_metric(spec: str) -> MetricHook:
    """Import ``module:function`` (a user metric: higher is better)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise UsageError(f"--metric '{spec}' is not module:function", "Example: --metric mymetrics:mean_average_precision")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--metric {spec}: cannot import it ({type(e).__name__}: {e})",
                         "Make the module importable (PYTHONPATH) and define function(outputs, data) -> float.") from None
    if not callable(fn):
        raise UsageError(f"--metric {spec} is not a function", "Define function(outputs, data) -> float.")
    return fn


def score_metric(hook: MetricHook, outputs: Mapping[str, np.ndarray], data: Mapping[str, np.ndarray], what: str) -> float:
    """Run a metric hook; anything it raises, or a non-finite score, is an InputError."""
    try:
        value = hook(dict(outputs), dict(data))
        score = float(value)
    except Exception as e:  # a user function may raise anything
        raise InputError(f"the metric hook failed on {what}: {type(e).__name__}: {str(e)[:200]}",
                          "Fix the metric function; it gets (outputs by name, the eval .npz arrays) and returns a float.") from None
    if not math.isfinite(score):
        raise InputError(f"the metric hook returned {score} on {what}", "Return a finite float (higher is better).")
    return score


@dataclass(frozen=True)
class Evaluation:
    """A quantized model's outputs judged for the task.

    ``drop`` is in the budget's unit: accuracy points (classification with labels; disagreement
    without), metric units (``--metric``), or for fidelity tasks the shortfall below the SQNR budget.
    """

    task: str
    accuracy: float | None
    agreement: float | None
    fidelity: dict[str, Fidelity]
    metric: float | None = None
    within_budget: bool = False
    drop: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)
    examples: int = 0
    # 95% intervals (see converters.selection): Wilson on accuracy and agreement, Agresti-Min (paired) on the drop.
    accuracy_ci95: tuple[float, float] | None = None
    agreement_ci95: tuple[float, float] | None = None
    drop_ci95: tuple[float, float] | None = None

    @property
    def min_sqnr_db(self) -> float:
        return min(f.sqnr_db for f in self.fidelity.values())

    @property
    def max_abs_error(self) -> float:
        return max(f.max_abs_error for f in self.fidelity.values())


def _top1(a: np.ndarray, axis: int) -> np.ndarray:
    return np.asarray(a).argmax(axis=axis).reshape(len(a), -1)[:, 0]


def accuracy(outputs: np.ndarray, y: np.ndarray | None, axis: int = -1) -> float | None:
    """Top-1 accuracy in percent over the class axis, or None without labels."""
    if y is None:
        return None
    return float((_top1(outputs, axis) == y).mean() * 100.0)


@dataclass(frozen=True)
class Judge:
    """How a run scores candidates: the task, its budget and the float reference."""

    task: str
    outputs: tuple[str, ...]
    class_axis: int | None
    float_out: dict[str, np.ndarray]
    labels: np.ndarray | None
    float_accuracy: float | None
    max_accuracy_drop: float
    min_sqnr_db: float
    metric: MetricHook | None = None
    float_metric: float | None = None
    data: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def examples(self) -> int:
        return len(self.float_out[self.outputs[0]])

    def subset(self, index: np.ndarray, what: str) -> Judge:
        """This judge on the examples at ``index`` (a split): float outputs, labels, data and the float scores re-taken there."""
        n = self.examples
        float_out = {k: np.asarray(v)[index] for k, v in self.float_out.items()}
        labels = None if self.labels is None else self.labels[index]
        data = {k: (np.asarray(v)[index] if np.ndim(v) and len(v) == n else v) for k, v in self.data.items()}
        float_acc = accuracy(float_out[self.outputs[0]], labels, self.class_axis) if self.class_axis is not None else None
        float_metric = score_metric(self.metric, float_out, data, f"the float model's outputs ({what})") if self.metric is not None else None
        return replace(self, float_out=float_out, labels=labels, float_accuracy=float_acc, float_metric=float_metric, data=data)

    @property
    def budget_text(self) -> str:
        if self.metric is not None:
            return f"metric drop <= {self.max_accuracy_drop:g}"
        if self.task == "classification":
            return f"accuracy drop <= {self.max_accuracy_drop:g} pt"
        return f"SQNR >= {self.min_sqnr_db:g} dB on every output"


def evaluate(judge: Judge, outputs: Mapping[str, np.ndarray], what: str) -> Evaluation:
    """Score one candidate's outputs (keyed like the float outputs) against the float model and the budget."""
    fid = {name: fidelity(outputs[name], judge.float_out[name]) for name in judge.outputs}
    acc = agree = score = None
    acc_ci = agree_ci = drop_ci = None
    n = judge.examples
    if judge.task == "classification" and judge.class_axis is not None:
        name = judge.outputs[0]
        acc = accuracy(outputs[name], judge.labels, judge.class_axis)
        q_top, f_top = _top1(outputs[name], judge.class_axis), _top1(judge.float_out[name], judge.class_axis)
        same = q_top == f_top
        agree = float(same.mean() * 100.0)
        agree_ci = wilson_interval(int(same.sum()), n)
        if judge.labels is not None:
            q_ok, f_ok = q_top == judge.labels, f_top == judge.labels
            acc_ci = wilson_interval(int(q_ok.sum()), n)
            drop_ci = paired_drop_interval(f_ok, q_ok)
        elif agree_ci is not None:  # no labels: the drop is the disagreement with the float model
            drop_ci = (100.0 - agree_ci[1], 100.0 - agree_ci[0])
    if judge.metric is not None:
        score = score_metric(judge.metric, outputs, judge.data, what)
        drop = float(judge.float_metric) - score
        ok = drop <= judge.max_accuracy_drop + 1e-9
    elif judge.task == "classification" and agree is not None:
        drop = (judge.float_accuracy - acc) if (acc is not None and judge.float_accuracy is not None) else 100.0 - agree
        ok = drop <= judge.max_accuracy_drop + 1e-9
    else:
        worst = min(f.sqnr_db for f in fid.values())
        drop = max(0.0, judge.min_sqnr_db - worst)
        ok = worst >= judge.min_sqnr_db
    if judge.metric is not None:
        drop_ci = None  # a metric hook scores the whole set, not each example: no interval
    return Evaluation(judge.task, acc, agree, fid, score, ok, drop, examples=n, accuracy_ci95=acc_ci, agreement_ci95=agree_ci, drop_ci95=drop_ci)


def input_independence_warnings(judge: Judge) -> list[str]:
    """Warnings when the float outputs do not depend on the input, or top-1 agreement is trivially 100%."""
    out = []
    for name in judge.outputs:
        f = np.asarray(judge.float_out[name], np.float64)
        if len(f) > 1 and float(np.ptp(f, axis=0).max(initial=0.0)) == 0.0:
            out.append(f"float output '{name}' is identical for every evaluation input: the checks cannot tell a good "
                       "quantization from a broken one (constant weights or untrained model?)")
    if judge.task == "classification" and judge.class_axis is not None:
        f = np.moveaxis(np.asarray(judge.float_out[judge.outputs[0]], np.float64), judge.class_axis, -1).reshape(len(judge.float_out[judge.outputs[0]]), -1)
        if f.shape[1] >= 2:
            part = np.sort(f, axis=1)
            margin = float(np.median(part[:, -1] - part[:, -2]))
            peak = float(np.abs(f).max())
            if peak > 0 and margin < peak / 256:
                out.append(f"the float model's top-1 margins (median {margin:.3g}) are below one int8 step of its output (peak {peak:.3g} / 256): "
                           "top-1 agreement will be decided by rounding (an untrained model's near-uniform softmax?); where the "
                           "output is int8 (TFLite's softmax step is fixed at 1/256) every probability below 1/512 rounds to 0, which "
                           "--task generic rejects too (0 dB SQNR): convert the trained model")
        top = _top1(judge.float_out[judge.outputs[0]], judge.class_axis)
        if len(top) > 1 and len(np.unique(top)) == 1:
            out.append(f"the float model predicts class {int(top[0])} for every evaluation input, so top-1 agreement is trivially "
                       "100%; look at the SQNR figures instead")
    return out


def latency_ms(model: LocalModel, feeds_one: Mapping[str, np.ndarray], runs: int, warmup: int = 5) -> np.ndarray:
    """Per-call latencies of ``model.run`` on one batch-1 example, in milliseconds."""
    call: Callable[[], object]
    if len(model.inputs) == 1 and len(feeds_one) == 1:
        x = next(iter(feeds_one.values()))
        call = lambda: model.predict(x)  # noqa: E731  # the edge call path
    else:
        call = lambda: model.run(feeds_one)  # noqa: E731
    for _ in range(warmup):
        call()
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        call()
        times[i] = time.perf_counter() - t0
    return times * 1e3
