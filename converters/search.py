"""The recipe search for one (profile, format): typed candidates, each measured against the task's budget."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from converters.base import Converter, Recipe
from converters.evaluate import Evaluation, evaluate
from converters.memory import release_freed_memory
from edgekit.bundle import _size
from edgekit.errors import AccuracyBudgetError, ConversionError, EdgekitError, IncompatibleError
from edgekit.manifest import Attempt, TensorSpec
from edgekit.profiles import HardwareProfile
from edgekit.runtime import LocalModel, load_model_file

if TYPE_CHECKING:
    from converters.pipeline import RunContext

__all__ = ["Candidate", "align", "search_recipes"]


@dataclass(frozen=True)
class Candidate:
    """One recipe's model: where it is, the loaded model and its outputs (by source output name) when it runs here."""

    recipe: Recipe
    path: Path
    model: LocalModel | None
    outputs: dict[str, np.ndarray] | None
    evaluation: Evaluation | None
    attempt_index: int


def _plain(name: str) -> str:
    for prefix in ("serving_default_",):
        name = name.removeprefix(prefix)
    return name.split(":")[0]


def align(model_specs: tuple[TensorSpec, ...], source_specs: tuple[TensorSpec, ...], what: str) -> dict[str, str]:
    """model tensor name -> source tensor name: by name, by name without exporter decorations, or by position."""
    m_names, s_names = [s.name for s in model_specs], [s.name for s in source_specs]
    if len(m_names) != len(s_names):
        raise ConversionError(f"the converted model has {len(m_names)} {what}s ({', '.join(m_names)}) but the source has "
                              f"{len(s_names)} ({', '.join(s_names)})", "The exporter dropped or added tensors; run with --debug.")
    if set(m_names) == set(s_names):
        return {n: n for n in m_names}
    plain = {_plain(n): n for n in s_names}
    if len(plain) == len(s_names) and all(_plain(n) in plain for n in m_names):
        return {n: plain[_plain(n)] for n in m_names}
    if len(m_names) == 1:
        return {m_names[0]: s_names[0]}
    return dict(zip(m_names, s_names))  # exporters that rename every tensor (Core ML) keep the order


def run_candidate(ctx: RunContext, model: LocalModel) -> dict[str, np.ndarray]:
    """The candidate's outputs on the evaluation set, keyed by source output name (streamed in batches)."""
    out_map = align(model.outputs, ctx.source.outputs, "output")
    parts: dict[str, list[np.ndarray]] = {}
    for feeds in ctx.evalset.batches(ctx.batch_size):
        outs = model.run(ctx.model_feeds(model, feeds))
        for m_name, arr in outs.items():
            parts.setdefault(out_map[m_name], []).append(np.asarray(arr))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _check_budget_early(ctx: RunContext, prof: HardwareProfile, conv: Converter) -> None:
    """Refuse before the recipe search when even int8 cannot fit the profile's model budget.

    From the float model in this format (built once per run): its runtime's activation arena / 4
    (float32 to int8) plus one byte per weight. The packaged model is checked again exactly.
    """
    act = ctx.baseline(conv).get("float_activation_bytes")
    if act is None:
        return
    need_mb = (act / 4 + ctx.source.param_count) / 1e6
    if need_mb > prof.memory.model_budget_mb:
        raise IncompatibleError(f"{prof.id}/{conv.format}: as int8 the model needs about {need_mb:.1f} MB (weights {ctx.source.param_count / 1e6:.1f} MB "
                                f"+ activations {act / 4e6:.1f} MB, from the float model's arena), over the profile's model budget of "
                                f"{prof.memory.model_budget_mb:g} MB", "Use a smaller model or input size, or a profile with more memory.")


def _attempt(recipe: Recipe, **kw) -> Attempt:
    return Attempt(recipe=recipe.name, description=recipe.description, **kw)


def search_recipes(ctx: RunContext, prof: HardwareProfile, conv: Converter, embedded) -> tuple[Candidate, list[Attempt], list[str]]:
    """Try the converter's recipes in order; the first within budget wins (else the best, with --allow-over-budget)."""
    opts = ctx.opts
    warnings = conv.check(ctx.source, prof)
    _check_budget_early(ctx, prof, conv)
    cap = opts.calibration_samples
    recipes = conv.recipes(prof, len(ctx.calib), cap)
    attempts: list[Attempt] = []
    best: Candidate | None = None
    for i, recipe in enumerate(recipes):
        ctx.check_interrupted()
        release_freed_memory()
        skip = ctx.memory.skip_reason(ctx, conv, recipe)
        if skip:
            attempts.append(_attempt(recipe, skipped=skip))
            continue
        ctx.progress(f"{prof.id}/{conv.format}: {recipe.name}")
        d = ctx.work / f"{prof.id}-{conv.format}-{i}"
        d.mkdir()
        calib = ctx.calib if recipe.options.calibration_all else ctx.calib.take(slice(0, cap))
        if embedded is not None:
            recipe = replace(recipe, options=replace(recipe.options, embed=embedded))
        try:
            path = conv.convert(ctx.source, prof, recipe, calib.x, d)
            if not conv.runs_here()[0]:  # cannot run here: the first recipe that builds is kept, unmeasured
                attempts.append(_attempt(recipe, size_bytes=_size(path), chosen=True))
                return Candidate(recipe, path, None, None, None, len(attempts) - 1), attempts, warnings
            model = load_model_file(path, conv.format)
            if embedded is not None:
                model.embedded = embedded  # type: ignore[attr-defined]  # the graph takes raw input
            outputs = run_candidate(ctx, model)
        except ConversionError as e:
            attempts.append(_attempt(recipe, error=e.message))
            continue
        except EdgekitError as e:  # a runtime refusing the produced model is this recipe's failure
            attempts.append(_attempt(recipe, error=f"{type(e).__name__}: {e.message}"))
            continue
        ctx.check_interrupted()  # a converter that turned the KeyboardInterrupt into its own error
        ev = evaluate(ctx.judge, outputs, f"{prof.id}/{conv.format} {recipe.name}")
        attempts.append(_attempt(recipe, size_bytes=_size(path), accuracy=ev.accuracy, agreement=ev.agreement, min_sqnr_db=ev.min_sqnr_db,
                                 metric=ev.metric, accuracy_drop=ev.drop if (ev.task == "classification" or ctx.judge.metric) else None,
                                 within_budget=ev.within_budget))
        cand = Candidate(recipe, path, model, outputs, ev, len(attempts) - 1)
        if best is None or ev.drop < best.evaluation.drop:  # type: ignore[union-attr]
            best = cand
        if ev.within_budget:
            return cand, attempts, warnings
    if best is None:
        raise ConversionError(f"{prof.id}/{conv.format}: every recipe failed: " + "; ".join(
            f"{a.recipe}: {a.error or 'skipped: ' + str(a.skipped)}" for a in attempts), "Run with --debug for the converter log.")
    if not opts.allow_over_budget:
        lines = "\n  ".join(_attempt_line(a) for a in attempts)
        raise AccuracyBudgetError(f"{prof.id}/{conv.format}: no recipe met the budget ({ctx.judge.budget_text}):\n  {lines}",
                                  "Relax the budget (--max-accuracy-drop / --min-sqnr-db), or --allow-over-budget to keep the best attempt.")
    kind = "fidelity" if (ctx.judge.task != "classification" and ctx.judge.metric is None) else "accuracy"
    warnings.append(f"over the {kind} budget ({ctx.judge.budget_text}) with --allow-over-budget: kept the best attempt, {best.recipe.name}")
    return best, attempts, warnings


def _attempt_line(a: Attempt) -> str:
    if a.skipped:
        return f"{a.recipe}: skipped ({a.skipped})"
    if a.error is not None:
        return f"{a.recipe}: failed ({a.error})"
    parts = []
    if a.accuracy_drop is not None:
        parts.append(f"drop {a.accuracy_drop:.2f}")
    if a.agreement is not None:
        parts.append(f"agreement {a.agreement:.1f}%")
    if a.min_sqnr_db is not None:
        parts.append(f"min SQNR {a.min_sqnr_db:.1f} dB")
    if a.metric is not None:
        parts.append(f"metric {a.metric:.4g}")
    return f"{a.recipe}: " + ", ".join(parts)
