"""Honest selection: recipes are chosen on one split of the evaluation data and reported on another.

The rule (``split_evaluation``): with at least ``MIN_SPLIT_EXAMPLES`` evaluation examples, a
seeded permutation (``SPLIT_SEED``) puts half of them in the **selection** split, on which the
search decides which recipe meets the budget, and the other half in the **test** split, on which
the reported accuracy and fidelity are measured: data the choice never saw. With labels the split
is stratified: each class is halved separately, so both splits keep the label mix. Below
``MIN_SPLIT_EXAMPLES`` a split would leave each half too small to decide or to report on
(at 100 examples one mistake moves accuracy by a whole point), so the recipe is chosen and
measured on the same examples and every report says "optimistic".

Confidence intervals on the reported (test) figures:

- accuracy (and top-1 agreement): the Wilson score interval at 95% (``wilson_interval``), which
  stays inside [0, 100] and behaves at 0% and 100% where the normal approximation does not;
- the accuracy drop against the float model: the Agresti-Min interval for a difference of paired
  proportions (Agresti & Min, Statistics in Medicine 24(5), 2005): both models are scored on the
  same examples, so only the discordant ones count (b: float right, int8 wrong; c: the reverse);
  half an example is added to each of the four cells and the Wald interval of (b - c) / n is taken.
  It needs no resampling, and unlike a paired bootstrap it does not collapse to [0, 0] when no
  example is discordant (seen on a 203-example test split: the bootstrap said the drop is exactly
  0, this interval says +-0.96 pt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["INTERVALS", "MIN_SPLIT_EXAMPLES", "SPLIT_SEED", "EvalSplit", "paired_drop_interval", "split_evaluation", "wilson_interval"]

MIN_SPLIT_EXAMPLES = 200
SELECTION_FRACTION = 0.5
SPLIT_SEED = 0
Z95 = 1.959963984540054
INTERVALS = ("95% intervals: accuracy and agreement by the Wilson score interval; accuracy drop vs float by the Agresti-Min interval "
             "for paired proportions (the same examples scored by both models)")


@dataclass(frozen=True)
class EvalSplit:
    """Which evaluation examples choose the recipe (``selection``) and which report on it (``test``)."""

    total: int
    selection: np.ndarray
    test: np.ndarray
    stratified: bool
    seed: int = SPLIT_SEED

    @property
    def optimistic(self) -> bool:
        """True when the choice and the reported figures come from the same examples."""
        return self.selection is self.test or np.array_equal(self.selection, self.test)

    @property
    def rule(self) -> str:
        if self.optimistic:
            return (f"chosen and measured on the same {self.total} examples (optimistic): fewer than {MIN_SPLIT_EXAMPLES} evaluation examples "
                    "are too few to split into a selection and a test half")
        how = "stratified by label" if self.stratified else "no labels, so not stratified"
        return (f"recipes chosen on a selection split of {len(self.selection)} examples; accuracy and fidelity reported on a test split of "
                f"{len(self.test)} examples the choice never saw (seeded permutation, seed {self.seed}, {how})")

    def to_dict(self) -> dict:
        """The manifest's ``quantization.evaluation_split`` and report.json's ``evaluation_split``."""
        return {"total": self.total, "selection_examples": len(self.selection), "test_examples": len(self.test), "seed": self.seed,
                "stratified": self.stratified, "optimistic": self.optimistic, "rule": self.rule, "intervals": INTERVALS}


def split_evaluation(n: int, labels: np.ndarray | None, seed: int = SPLIT_SEED) -> EvalSplit:
    """Split ``n`` evaluation examples into selection and test index arrays (both sorted), by the module's rule."""
    everything = np.arange(n)
    if n < MIN_SPLIT_EXAMPLES:
        return EvalSplit(n, everything, everything, stratified=False, seed=seed)
    rng = np.random.default_rng(seed)
    if labels is not None and len(labels) == n:
        sel: list[np.ndarray] = []
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            # A class of one example goes to the test split: the reported figures should see every class.
            sel.append(members[: math.floor(len(members) * SELECTION_FRACTION)])
        selection = np.sort(np.concatenate(sel))
        stratified = True
    else:
        selection = np.sort(rng.permutation(n)[: round(n * SELECTION_FRACTION)])
        stratified = False
    test = np.setdiff1d(everything, selection)
    return EvalSplit(n, selection, test, stratified=stratified, seed=seed)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion, in percent; None for n = 0."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, (centre - half) * 100.0), min(100.0, (centre + half) * 100.0)


def paired_drop_interval(float_correct: np.ndarray, quant_correct: np.ndarray, z: float = Z95) -> tuple[float, float] | None:
    """95% Agresti-Min interval of (float accuracy - quantized accuracy) in points, from per-example correctness."""
    f = np.asarray(float_correct, bool)
    q = np.asarray(quant_correct, bool)
    n = len(f)
    if n == 0 or len(q) != n:
        return None
    b = float(np.sum(f & ~q)) + 0.5  # float right, quantized wrong
    c = float(np.sum(~f & q)) + 0.5  # float wrong, quantized right
    m = n + 2.0  # each of the four cells gained half an example
    diff = (b - c) / m
    se = math.sqrt(max(0.0, (b + c) - (b - c) ** 2 / m)) / m
    return max(-100.0, (diff - z * se) * 100.0), min(100.0, (diff + z * se) * 100.0)
