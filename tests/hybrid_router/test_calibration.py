"""Calibration maths: temperature fit, ECE, Clopper-Pearson, and the Learn-then-Test threshold and its guarantee."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid_router.calibration import (choose_for_budget, choose_for_max_loss, clopper_pearson_upper, escalation_curve,
                                       expected_calibration_error, fit_temperature)
from hybrid_router.policy import calibrated_probs


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sample(rng: np.random.Generator, n: int, true_t: float) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(z / true_t): the right temperature is true_t."""
    z = rng.normal(0, 4, size=(n, 10))
    p = _softmax(z / true_t)
    y = np.array([rng.choice(10, p=row) for row in p])
    return z, y


@pytest.mark.parametrize("true_t", [0.7, 2.5])
def test_fit_temperature_recovers_the_true_temperature(true_t: float) -> None:
    z, y = _sample(np.random.default_rng(0), 4000, true_t)
    assert fit_temperature(z, y, "logits") == pytest.approx(true_t, rel=0.1)


def test_scaling_with_the_fitted_temperature_lowers_ece() -> None:
    z, y = _sample(np.random.default_rng(1), 3000, 2.5)
    t = fit_temperature(z[:1000], y[:1000], "logits")
    before = expected_calibration_error(_softmax(z[1000:]), y[1000:])
    after = expected_calibration_error(calibrated_probs(z[1000:], t, "logits"), y[1000:])
    assert after < before / 2


def test_clopper_pearson_known_values() -> None:
    # zero successes: the bound solves (1 - p)^n = delta
    assert clopper_pearson_upper(0, 600, 0.05) == pytest.approx(1 - 0.05 ** (1 / 600), rel=1e-9)
    assert clopper_pearson_upper(5, 100, 0.05) == pytest.approx(0.1024, abs=5e-4)  # textbook one-sided 95% value
    assert clopper_pearson_upper(10, 10, 0.05) == 1.0


def _population(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Device confidence, device correct, cloud correct: the device errs more when unsure; the cloud is 97% right."""
    conf = rng.uniform(0.3, 1.0, n)
    dev_ok = rng.uniform(size=n) < conf ** 0.5
    cloud_ok = rng.uniform(size=n) < 0.97
    return conf, dev_ok, cloud_ok


def _true_loss(threshold: float) -> float:
    """Exact population loss of a threshold for _population (numerical integral)."""
    c = np.linspace(0.3, 1.0, 200_001)
    kept = c >= threshold
    return float(np.mean(kept * (0.97 - np.sqrt(c))) * 1.0)


def test_the_certified_threshold_holds_its_guarantee_on_fresh_data() -> None:
    """Over many calibration samples, the chosen threshold's true loss exceeds the target at most ~delta of the time."""
    rng = np.random.default_rng(2)
    alpha, delta, trials = 0.03, 0.1, 200
    violations = feasible = 0
    for _ in range(trials):
        ch = choose_for_max_loss(*_population(rng, 400), alpha, delta)
        if ch.feasible:
            feasible += 1
            violations += _true_loss(ch.threshold) > alpha
    assert feasible > trials * 0.9
    assert violations / feasible <= delta  # the bound ignores helpful examples, so in practice well under delta


def test_the_point_estimate_violates_more_often_than_the_bound() -> None:
    rng = np.random.default_rng(3)
    alpha, delta = 0.03, 0.1
    point_viol = bound_viol = 0
    for _ in range(200):
        ch = choose_for_max_loss(*_population(rng, 400), alpha, delta)
        point_viol += _true_loss(ch.point_threshold) > alpha
        bound_viol += ch.feasible and _true_loss(ch.threshold) > alpha
        assert ch.escalation >= ch.point_escalation - 1e-12  # the guarantee never costs less escalation
    assert point_viol > bound_viol


def test_infeasible_when_the_data_is_too_small_for_the_target() -> None:
    conf, dev_ok, cloud_ok = _population(np.random.default_rng(4), 300)
    ch = choose_for_max_loss(conf, dev_ok, cloud_ok, 0.005, 0.05)  # 300 examples cannot certify 0.5 points: (1-0.005)^300 > 0.05
    assert not ch.feasible
    assert ch.escalation == 1.0
    assert ch.best_bound > 0.005


def test_budget_threshold_respects_the_budget() -> None:
    conf, dev_ok, cloud_ok = _population(np.random.default_rng(5), 1000)
    for budget in (0.0, 0.1, 0.25, 0.5):
        b = choose_for_budget(conf, dev_ok, cloud_ok, budget, 0.05)
        esc = float((conf < b.threshold).mean())
        assert esc == pytest.approx(b.escalation)
        assert esc <= budget + 1e-12
        assert esc > budget - 0.01  # distinct confidences: the budget is used up to one example


def test_escalation_curve_ends_at_device_only_and_moves_towards_cloud_only() -> None:
    conf, dev_ok, cloud_ok = _population(np.random.default_rng(6), 500)
    c = escalation_curve(conf, dev_ok, cloud_ok)
    assert c["escalation"][-1] == 0.0
    assert c["hybrid_accuracy"][-1] == pytest.approx(dev_ok.mean())
    assert np.all(np.diff(c["harmful"]) >= 0)  # more kept, more harmful: the monotonicity fixed-sequence testing needs
