"""The escalation decision: temperature scaling on logits and on probabilities, the threshold, batch == single."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid_router.policy import EscalationPolicy, calibrated_probs, decide, decide_batch


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 3.7])
def test_scaling_log_probabilities_equals_scaling_logits(temperature: float) -> None:
    z = np.random.default_rng(0).normal(0, 3, size=(50, 10))
    from_logits = calibrated_probs(z, temperature, "logits")
    from_probs = calibrated_probs(_softmax(z), temperature, "probabilities", probability_floor=1e-300)
    np.testing.assert_allclose(from_probs, from_logits, atol=1e-9)
    np.testing.assert_allclose(from_logits, _softmax(z / temperature), atol=1e-12)


def test_higher_temperature_lowers_confidence_and_keeps_the_label() -> None:
    p = np.array([0.7, 0.2, 0.1])
    hot = calibrated_probs(p, 2.0)
    cold = calibrated_probs(p, 0.5)
    assert hot.argmax() == cold.argmax() == 0
    assert hot.max() < 0.7 < cold.max()


def test_quantized_zeros_stay_finite() -> None:
    p = np.array([255 / 256, 0, 0, 1 / 256, 0], dtype=np.float32)
    q = calibrated_probs(p, 1.5, probability_floor=1 / 512)
    assert np.isfinite(q).all() and abs(q.sum() - 1) < 1e-12 and q.argmax() == 0


def test_decide_escalates_below_the_threshold_only() -> None:
    policy = EscalationPolicy(temperature=1.0, threshold=0.8, device_output="probabilities")
    sure = decide(np.array([0.05, 0.9, 0.05]), policy)
    unsure = decide(np.array([0.4, 0.35, 0.25]), policy)
    assert (sure.label, sure.escalate) == (1, False)
    assert (unsure.label, unsure.escalate) == (0, True)
    assert unsure.confidence == pytest.approx(0.4, abs=1e-6)


def test_batch_decisions_match_single_ones() -> None:
    rng = np.random.default_rng(1)
    out = _softmax(rng.normal(0, 2, size=(200, 10)))
    policy = EscalationPolicy(temperature=1.3, threshold=0.6)
    labels, conf, probs, esc = decide_batch(out, policy)
    for i in range(len(out)):
        d = decide(out[i], policy)
        assert (d.label, d.escalate) == (labels[i], esc[i])
        assert d.confidence == conf[i]
    assert 0 < esc.mean() < 1


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0, "threshold": 0.5}, {"temperature": 1.0, "threshold": 1.5},
                                    {"temperature": -1.0, "threshold": 0.5}])
def test_invalid_policies_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        EscalationPolicy(**kwargs)


def test_policy_from_the_manifest(calibrated) -> None:
    p = EscalationPolicy.from_router_policy(calibrated.policy)
    assert (p.temperature, p.threshold, p.device_output) == (calibrated.policy.temperature, calibrated.policy.threshold, "probabilities")
