"""The recipe search for one (profile, format): typed candidates, each measured against the task's budget and timed on this host."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from converters.base import Converter, Recipe
from converters.evaluate import Evaluation, Judge, evaluate
from converters.memory import release_freed_memory
from converters.selection import EvalSplit, split_evaluation
from converters.speed import FIDELITY_MARGIN_DB, FIDELITY_MAX_PARAMS, FIDELITY_SIBLINGS, SPEED_CLASSES, HostRuntime, Speed, displaces, early_stop_reason, \
    fidelity_sibling, graph_key, host_runtime, load_for_timing, measure_speed, slowdown_reason, speed_class
from edgekit.bundle import _size
from edgekit.errors import AccuracyBudgetError, ConversionError, EdgekitError, IncompatibleError
from edgekit.manifest import Attempt, SplitScore, TensorSpec
from edgekit.profiles import HardwareProfile
from edgekit.runtime import LocalModel, load_model_file

if TYPE_CHECKING:
    from converters.pipeline import RunContext

__all__ = ["Candidate", "align", "search_recipes", "split_judges"]


@dataclass(frozen=True)
class Candidate:
    """One recipe's model: where it is, the loaded model and its outputs (by source output name) when it runs here."""

    recipe: Recipe
    path: Path
    model: LocalModel | None
    outputs: dict[str, np.ndarray] | None
    evaluation: Evaluation | None  # on the test split: the reported figures
    attempt_index: int
    selection: Evaluation | None = None  # on the selection split: the decision
    speed: Speed | None = None
    why: str = ""  # why it was kept over a faster-tried candidate, when it was (the report's verification)
    graph_ratio: float | None = None  # the fastest within-budget timing of its graph so far, x float: what later recipes must beat

    def __post_init__(self) -> None:
        if self.graph_ratio is None and self.speed is not None:
            object.__setattr__(self, "graph_ratio", self.speed.ratio)


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
    return Attempt(recipe=recipe.name, description=recipe.description, speed_class=SPEED_CLASSES[speed_class(recipe)], **kw)


def split_judges(judge: Judge) -> tuple[EvalSplit, Judge, Judge]:
    """The evaluation split (converters.selection's rule) and the judge of each side: (split, selection, test)."""
    split = split_evaluation(judge.examples, judge.labels)
    if split.optimistic:
        return split, judge, judge
    return split, judge.subset(split.selection, "selection split"), judge.subset(split.test, "test split")


def _score(ev: Evaluation, split: str, judge: Judge) -> SplitScore:
    drop = ev.drop if (ev.task == "classification" or judge.metric is not None) else None
    return SplitScore(split=split, examples=ev.examples, accuracy=ev.accuracy, accuracy_ci95=ev.accuracy_ci95, accuracy_drop=drop,
                      accuracy_drop_ci95=ev.drop_ci95 if drop is not None else None, agreement=ev.agreement, agreement_ci95=ev.agreement_ci95,
                      min_sqnr_db=ev.min_sqnr_db, metric=ev.metric, within_budget=ev.within_budget)


def _float_for_timing(ctx: RunContext, conv: Converter, host: HostRuntime) -> tuple[LocalModel, Path]:
    """The float model in this format, loaded once per run the way ``host`` times it."""
    ctx.baseline(conv)
    path = ctx.float_paths[conv.format]
    key = (conv.format, host.providers, host.threads)
    if key not in ctx.timing_models:
        ctx.timing_models[key] = load_for_timing(path, host)
    return ctx.timing_models[key], path


def _time(ctx: RunContext, conv: Converter, host: HostRuntime, path: Path, embedded) -> tuple[Speed, str | None]:
    """The candidate's speed against float on this host, and the measured reason when it is slower."""
    float_model, float_path = _float_for_timing(ctx, conv, host)
    model = load_for_timing(path, host)
    if embedded is not None:
        model.embedded = embedded  # type: ignore[attr-defined]  # the graph takes raw input
    feeds, float_feeds = ctx.model_feeds(model, ctx.evalset.first), ctx.model_feeds(float_model, ctx.evalset.first)
    speed = measure_speed(model, float_model, feeds, float_feeds, ctx.opts.latency_runs, host)
    reason = slowdown_reason(path, float_path, model, feeds, speed) if speed.slower_than_float else None
    return speed, reason


def search_recipes(ctx: RunContext, prof: HardwareProfile, conv: Converter, embedded) -> tuple[Candidate, list[Attempt], list[str]]:
    """Try the recipes fastest speed class first; among those within budget on the selection split, the fastest wins.

    Each candidate is scored on the selection split (the decision) and the test split (the report),
    and timed against the float model on this host (converters.speed). A candidate within budget
    displaces the best so far only when more than DISPLACE_TOLERANCE faster; recipes that cannot be
    faster than the best are skipped with the reason (``early_stop_reason``), except, on models of at most
    FIDELITY_MAX_PARAMS weights, up to FIDELITY_SIBLINGS bias-corrected variants of the best's graph
    (``fidelity_sibling``): the same speed, and one within budget whose
    outputs are more than FIDELITY_MARGIN_DB closer to the float model's (min SQNR on the selection split) is kept
    instead. Without any candidate within budget: the lowest selection drop, with --allow-over-budget.
    """
    opts = ctx.opts
    warnings = conv.check(ctx.source, prof)
    _check_budget_early(ctx, prof, conv)
    cap = opts.calibration_samples
    recipes = sorted(conv.recipes(prof, len(ctx.calib), cap), key=speed_class)  # stable: the converter's order within a class
    split, sel_judge, test_judge = ctx.split, ctx.selection_judge, ctx.test_judge
    assert split is not None and sel_judge is not None and test_judge is not None
    same = split.optimistic
    host = host_runtime(conv.format, prof) if conv.runs_here()[0] else None
    attempts: list[Attempt] = []
    best: Candidate | None = None  # the fastest within budget so far
    fallback: Candidate | None = None  # the lowest selection drop, for --allow-over-budget
    timed: dict[tuple, tuple[str, float]] = {}  # graph_key -> the fastest recipe timed with that graph, and its ratio to float
    siblings = 0 if ctx.source.param_count <= FIDELITY_MAX_PARAMS else FIDELITY_SIBLINGS  # fidelity siblings tried (none on large models)
    for i, recipe in enumerate(recipes):
        ctx.check_interrupted()
        skip = early_stop_reason(recipe, best.recipe, best.graph_ratio, timed) if best is not None else None
        if skip and best is not None and best.speed is not None and siblings < FIDELITY_SIBLINGS and fidelity_sibling(recipe, best.recipe):
            skip, siblings = None, siblings + 1
        if not skip:  # hand the previous recipe's peak back before measuring what this one would need (not for a recipe skipped anyway)
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
            if host is None:  # cannot run here: the first recipe that builds is kept, unmeasured
                attempts.append(_attempt(recipe, size_bytes=_size(path), chosen=True))
                return Candidate(recipe, path, None, None, None, len(attempts) - 1), attempts, warnings
            model = load_model_file(path, conv.format)
            if embedded is not None:
                model.embedded = embedded  # type: ignore[attr-defined]  # the graph takes raw input
            outputs = run_candidate(ctx, model)
            speed, slower = _time(ctx, conv, host, path, embedded)
        except ConversionError as e:
            attempts.append(_attempt(recipe, error=e.message))
            continue
        except EdgekitError as e:  # a runtime refusing the produced model is this recipe's failure
            attempts.append(_attempt(recipe, error=f"{type(e).__name__}: {e.message}"))
            continue
        ctx.check_interrupted()  # a converter that turned the KeyboardInterrupt into its own error
        what = f"{prof.id}/{conv.format} {recipe.name}"
        if same:
            ev_sel = ev_test = evaluate(test_judge, outputs, what)
        else:
            ev_sel = evaluate(sel_judge, {k: v[split.selection] for k, v in outputs.items()}, what + " (selection split)")
            ev_test = evaluate(test_judge, {k: v[split.test] for k, v in outputs.items()}, what + " (test split)")
        key = graph_key(recipe)
        if key not in timed or speed.ratio < timed[key][1]:
            timed[key] = (recipe.name, speed.ratio)
        flat = _score(ev_test, "test", test_judge)
        attempts.append(_attempt(recipe, size_bytes=_size(path), accuracy=flat.accuracy, agreement=flat.agreement, min_sqnr_db=flat.min_sqnr_db,
                                 metric=flat.metric, accuracy_drop=flat.accuracy_drop, within_budget=ev_sel.within_budget,
                                 latency_ms_p50=speed.p50_ms, float_latency_ms_p50=speed.float_p50_ms, speedup_vs_float=speed.speedup,
                                 latency_host=speed.how, slower_than_float=slower,
                                 selection=_score(ev_sel, "same" if same else "selection", sel_judge),
                                 test=flat.model_copy(update={"split": "same"}) if same else flat))
        cand = Candidate(recipe, path, model, outputs, ev_test, len(attempts) - 1, ev_sel, speed)
        if fallback is None or ev_sel.drop < fallback.selection.drop:  # type: ignore[union-attr]
            fallback = cand
        if ev_sel.within_budget and (best is None or displaces(speed.ratio, best.graph_ratio)):  # type: ignore[arg-type]
            best = cand
        elif ev_sel.within_budget and best is not None and graph_key(recipe) == graph_key(best.recipe) and \
                (gain := _more_faithful(ev_sel, best.selection)) is not None:
            # The same graph runs at the same speed: the two timings differ by noise, and the faster one stays the reference
            # later recipes must beat (a noisy slow timing of the kept file never lets a slower graph displace it).
            best = replace(cand, graph_ratio=min(speed.ratio, best.graph_ratio),  # type: ignore[type-var]
                           why=f"{recipe.name} kept over {best.recipe.name}: the same graph (the same speed: timed at {speed.ratio:.2f}x "
                               f"and {best.graph_ratio:.2f}x the float latency, timing noise), outputs closer to the float model's on the "
                               f"{'evaluation data' if same else 'selection split'} (min SQNR {gain[0]:.1f} vs {gain[1]:.1f} dB)")
        del model, outputs, cand
    if best is not None:
        return best, attempts, warnings
    if fallback is None:
        raise ConversionError(f"{prof.id}/{conv.format}: every recipe failed: " + "; ".join(
            f"{a.recipe}: {a.error or 'skipped: ' + str(a.skipped)}" for a in attempts), "Run with --debug for the converter log.")
    if not opts.allow_over_budget:
        lines = "\n  ".join(_attempt_line(a) for a in attempts)
        raise AccuracyBudgetError(f"{prof.id}/{conv.format}: no recipe met the budget ({ctx.judge.budget_text}) on the "
                                  f"{'evaluation data' if same else 'selection split'}:\n  {lines}",
                                  "Relax the budget (--max-accuracy-drop / --min-sqnr-db), or --allow-over-budget to keep the best attempt.")
    kind = "fidelity" if (ctx.judge.task != "classification" and ctx.judge.metric is None) else "accuracy"
    warnings.append(f"over the {kind} budget ({ctx.judge.budget_text}) with --allow-over-budget: kept the best attempt, {fallback.recipe.name}")
    return fallback, attempts, warnings


def _more_faithful(ev: Evaluation, best: Evaluation | None) -> tuple[float, float] | None:
    """(SQNR of ``ev``, of ``best``) when ``ev``'s outputs are more than FIDELITY_MARGIN_DB closer to the float model's; else None."""
    if best is None or not ev.fidelity or not best.fidelity:
        return None
    mine, theirs = ev.min_sqnr_db, best.min_sqnr_db
    return (mine, theirs) if mine > theirs + FIDELITY_MARGIN_DB else None


def _attempt_line(a: Attempt) -> str:
    if a.skipped:
        return f"{a.recipe}: skipped ({a.skipped})"
    if a.error is not None:
        return f"{a.recipe}: failed ({a.error})"
    parts = []
    if a.selection is not None and a.selection.accuracy_drop is not None and a.selection.split == "selection":
        parts.append(f"selection drop {a.selection.accuracy_drop:.2f}")
    if a.accuracy_drop is not None:
        parts.append(f"{'test ' if a.selection is not None and a.selection.split == 'selection' else ''}drop {a.accuracy_drop:.2f}")
    if a.agreement is not None:
        parts.append(f"agreement {a.agreement:.1f}%")
    if a.min_sqnr_db is not None:
        parts.append(f"min SQNR {a.min_sqnr_db:.1f} dB")
    if a.metric is not None:
        parts.append(f"metric {a.metric:.4g}")
    return f"{a.recipe}: " + ", ".join(parts)
