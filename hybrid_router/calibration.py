"""Choosing the router's temperature and threshold from labelled data (pure NumPy/SciPy).

Temperature: minimise the negative log-likelihood of ``softmax(z / T)`` on the temperature
split (Guo et al., 2017).

Threshold for ``--max-loss α`` with confidence ``1 - δ``: the loss of a threshold ``t`` is
cloud-only accuracy minus hybrid accuracy, ``E[kept · (cloud right − device right)]``. We bound
it from above by the rate of *harmful* examples, ``r(t) = P(kept, device wrong, cloud right)``
(examples where the device is right and the cloud wrong can only help; ignoring them keeps
the bound valid). ``r`` only shrinks as ``t`` grows, so Learn-then-Test (Angelopoulos et al.,
2021) with fixed-sequence testing applies: walk the thresholds from the highest (most
escalation) down, test ``H0: r(t) > α`` with the exact binomial (Clopper-Pearson) p-value
``P(Bin(n, α) ≤ k(t))``, keep going while it is rejected at level δ, stop at the first
failure. The lowest threshold reached is certified: with probability ≥ 1 − δ over the
calibration sample, its loss on unseen data from the same distribution is ≤ α. No union
bound over thresholds is needed. The point-estimate threshold (same walk, empirical loss ≤ α)
is reported next to it, so the price of the guarantee is visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hybrid_router.policy import calibrated_probs

__all__ = [
    "BudgetChoice",
    "LossChoice",
    "ReliabilityBins",
    "choose_for_budget",
    "choose_for_max_loss",
    "clopper_pearson_upper",
    "escalation_curve",
    "expected_calibration_error",
    "fit_temperature",
    "reliability_bins",
]


def fit_temperature(outputs: np.ndarray, y: np.ndarray, device_output: str = "probabilities", probability_floor: float = 1e-6) -> float:
    """The temperature minimising NLL on (outputs, y), searched on log T in [-3, 3]."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(outputs, dtype=np.float64)
    if device_output == "probabilities":
        z = np.log(np.maximum(z, probability_floor))
    y = np.asarray(y, dtype=np.int64)

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        s = s - s.max(axis=1, keepdims=True)
        logp = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean())

    res = minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


@dataclass(frozen=True)
class ReliabilityBins:
    """Per confidence bin: mean confidence, accuracy and count (for the reliability diagram and ECE)."""

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def reliability_bins(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> ReliabilityBins:
    """Equal-width bins over top-1 confidence."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=conf, minlength=n_bins) / count
        acc = np.bincount(which, weights=correct.astype(float), minlength=n_bins) / count
    return ReliabilityBins(edges, mean_conf, acc, count)


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """ECE: the count-weighted mean |accuracy − confidence| over equal-width bins."""
    b = reliability_bins(probs, y, n_bins)
    m = b.count > 0
    return float((b.count[m] * np.abs(b.accuracy[m] - b.confidence[m])).sum() / b.count.sum())


def clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    """One-sided (1 − δ) Clopper-Pearson upper bound on a binomial rate from k successes in n."""
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(1.0 - delta, k + 1, n - k))


def _between(ts: np.ndarray, i: int) -> float:
    """A threshold keeping the same examples as ``ts[i]`` but half-way to the next lower confidence.

    Robust to the last-bit differences a device may show when it recomputes the confidence."""
    if i + 1 < len(ts):
        return float((ts[i] + ts[i + 1]) / 2)
    return float(ts[i] / 2)


def _candidates(conf: np.ndarray) -> np.ndarray:
    """Thresholds worth testing, descending: each distinct confidence (escalate iff conf < t)."""
    return np.unique(conf)[::-1]


def escalation_curve(conf: np.ndarray, device_correct: np.ndarray, cloud_correct: np.ndarray) -> dict[str, np.ndarray]:
    """For each candidate threshold (descending): escalation rate, hybrid accuracy and harmful count."""
    ts = _candidates(conf)
    order = np.argsort(-conf, kind="stable")
    c_sorted = conf[order]
    harmful = (~device_correct & cloud_correct)[order]
    gain = (cloud_correct.astype(int) - device_correct.astype(int))[order]
    n = len(conf)
    # kept(t) = the first m examples in descending confidence, m = #(conf >= t)
    m = np.searchsorted(-c_sorted, -ts, side="right")
    cum_harm = np.concatenate([[0], np.cumsum(harmful)])
    cum_gain = np.concatenate([[0], np.cumsum(gain)])
    cloud_acc = cloud_correct.mean()
    loss = cum_gain[m] / n  # cloud-only minus hybrid accuracy
    return {"threshold": ts, "kept": m, "escalation": (n - m) / n, "hybrid_accuracy": cloud_acc - loss, "loss": loss,
            "harmful": cum_harm[m]}


@dataclass(frozen=True)
class LossChoice:
    """The threshold chosen for a maximum loss, with its guarantee and its price."""

    feasible: bool
    threshold: float
    escalation: float
    loss: float
    loss_bound: float
    point_threshold: float
    point_escalation: float
    point_loss: float
    best_bound: float
    best_bound_escalation: float
    n: int


def choose_for_max_loss(conf: np.ndarray, device_correct: np.ndarray, cloud_correct: np.ndarray, max_loss: float,
                        delta: float) -> LossChoice:
    """Learn-then-Test fixed-sequence choice (module docstring). ``max_loss`` is a fraction (0.005 = 0.5 points).

    Infeasible when even the highest threshold that keeps any example on the device cannot be
    certified; ``best_bound`` then says the smallest loss this data can certify.
    """
    from scipy.stats import binom

    curve = escalation_curve(conf, device_correct, cloud_correct)
    n = len(conf)
    ts, harm, loss, esc = curve["threshold"], curve["harmful"], curve["loss"], curve["escalation"]
    pvals = binom.cdf(harm, n, max_loss)
    certified = -1
    for i in range(len(ts)):
        if pvals[i] > delta:
            break
        certified = i
    point = -1
    for i in range(len(ts)):
        if loss[i] > max_loss:
            break
        point = i
    never = 1.0 + 1e-6  # escalate everything: the cloud-only policy
    p_t = _between(ts, point) if point >= 0 else never
    p_e = float(esc[point]) if point >= 0 else 1.0
    p_l = float(loss[point]) if point >= 0 else 0.0
    best_bound = clopper_pearson_upper(int(harm[0]), n, delta)
    if certified < 0:
        return LossChoice(False, never, 1.0, 0.0, best_bound, p_t, p_e, p_l, best_bound, float(esc[0]), n)
    i = certified
    return LossChoice(True, _between(ts, i), float(esc[i]), float(loss[i]), clopper_pearson_upper(int(harm[i]), n, delta),
                      p_t, p_e, p_l, best_bound, float(esc[0]), n)


@dataclass(frozen=True)
class BudgetChoice:
    """The threshold that sends at most a budgeted share of traffic to the cloud, and its expected loss."""

    threshold: float
    escalation: float
    loss: float
    loss_bound: float
    n: int


def choose_for_budget(conf: np.ndarray, device_correct: np.ndarray, cloud_correct: np.ndarray, budget: float,
                      delta: float) -> BudgetChoice:
    """The lowest-confidence ``budget`` share escalates; ties at the boundary stay on the device."""
    curve = escalation_curve(conf, device_correct, cloud_correct)
    n = len(conf)
    # escalation falls as the threshold falls; the last candidate (the lowest confidence) keeps everything
    i = int(np.flatnonzero(curve["escalation"] <= budget + 1e-12)[0])  # the highest threshold within budget
    return BudgetChoice(_between(curve["threshold"], i), float(curve["escalation"][i]), float(curve["loss"][i]),
                        clopper_pearson_upper(int(curve["harmful"][i]), n, delta), n)


def scaled_confidence(outputs: np.ndarray, temperature: float, device_output: str, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities and top-1 confidence for a batch of device outputs."""
    probs = calibrated_probs(outputs, temperature, device_output, floor)
    return probs, probs.max(axis=1)
