"""HybridClassifier: device first, cloud when unsure, the device answer flagged degraded whatever the cloud does."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import InputError
from hybrid_router import BreakerConfig, BreakerState, CircuitBreaker, EscalationPolicy, HybridClassifier, KServeClient, Recorder


class ListRecorder:
    """Keeps every record call (satisfies the Recorder protocol)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def record(self, **kw) -> None:
        self.calls.append(kw)


def _data(digits_cloud) -> tuple[np.ndarray, np.ndarray]:
    d = np.load(digits_cloud["test"])
    return d["x"], d["y"]


def _clf(device_bundle: Path, url: str, *, threshold: float = 1.000001, deadline_ms: float = 500, breaker=None, recorder=None):
    """Every input escalates (threshold above any confidence) unless told otherwise."""
    from edgekit.runtime import load

    cloud = KServeClient(url, "digits", input_name="input")
    return HybridClassifier(load(device_bundle), cloud, EscalationPolicy(1.0, threshold), deadline_ms=deadline_ms,
                            breaker=breaker, recorder=recorder)


def test_from_bundle_uses_the_manifest_policy_and_the_real_cloud(calibrated, cloud: str, digits_cloud) -> None:
    x, y = _data(digits_cloud)
    rec = ListRecorder()
    clf = HybridClassifier.from_bundle(calibrated.bundle, cloud, "digits", deadline_ms=2000, recorder=rec)
    try:
        preds = [clf.predict(xi) for xi in x]
    finally:
        clf.close()
    esc = [p for p in preds if p.escalated]
    assert clf.policy.threshold == calibrated.policy.threshold
    assert 0 < len(esc) < len(preds)
    assert all(p.source == "cloud" and not p.degraded and p.reason == "escalated" for p in esc)
    assert all(p.source == "device" and p.reason == "confident" for p in preds if not p.escalated)
    assert all(p.confidence < clf.policy.threshold for p in esc)
    assert np.mean([p.label == t for p, t in zip(preds, y)]) >= 0.9
    assert len(rec.calls) == len(preds)
    assert {c["source"] for c in rec.calls} == {"device", "cloud"}
    assert all(c["error"] is None and not c["degraded"] for c in rec.calls)


def test_a_bundle_without_policy_is_refused(device_bundle: Path) -> None:
    with pytest.raises(InputError, match="no router policy"):
        HybridClassifier.from_bundle(device_bundle, "http://127.0.0.1:1", "digits")


@pytest.mark.parametrize("mode,reason", [("500", "bad_response"), ("503", "overloaded"), ("429", "overloaded"),
                                         ("garbage", "bad_response"), ("hang", "timeout")])
def test_every_cloud_failure_gives_the_device_answer_degraded(device_bundle: Path, digits_cloud, bad_cloud, mode: str, reason: str) -> None:
    bad_cloud.mode = mode
    x, _ = _data(digits_cloud)
    rec = ListRecorder()
    clf = _clf(device_bundle, bad_cloud.url, deadline_ms=300, recorder=rec)
    device = np.asarray(clf.local.predict(x[:1]))[0].argmax()
    t0 = time.monotonic()
    p = clf.predict(x[0])
    took_ms = (time.monotonic() - t0) * 1000
    clf.close()
    assert (p.source, p.degraded, p.reason, p.label) == ("device", True, reason, device)
    assert took_ms < 300 + 250  # never much past the deadline (e2e checks the tight bound)
    assert rec.calls[0] == {"latency_ms": p.latency_ms, "confidence": p.confidence, "source": "device", "error": None,
                            "escalated": True, "degraded": True}


def test_refused_cloud_is_unreachable_then_the_breaker_opens(device_bundle: Path, digits_cloud, refused_url: str) -> None:
    x, _ = _data(digits_cloud)
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=3, cooldown_s=60))
    clf = _clf(device_bundle, refused_url, breaker=breaker)
    reasons = [clf.predict(xi).reason for xi in x[:6]]
    clf.close()
    assert reasons == ["unreachable"] * 3 + ["circuit_open"] * 3
    assert clf.breaker_state is BreakerState.OPEN


def test_breaker_recovers_through_half_open(device_bundle: Path, digits_cloud, bad_cloud) -> None:
    x, _ = _data(digits_cloud)
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=2, cooldown_s=0.2))
    clf = _clf(device_bundle, bad_cloud.url, breaker=breaker)
    bad_cloud.mode = "503"
    assert [clf.predict(x[0]).reason for _ in range(3)] == ["overloaded", "overloaded", "circuit_open"]
    bad_cloud.mode = "ok"
    time.sleep(0.25)
    assert clf.breaker_state is BreakerState.HALF_OPEN
    p = clf.predict(x[0])
    clf.close()
    assert (p.source, p.degraded, p.label) == ("cloud", False, 3)
    assert clf.breaker_state is BreakerState.CLOSED


def test_no_cloud_configured_is_degraded_unreachable(device_bundle: Path, digits_cloud) -> None:
    from edgekit.runtime import load

    x, _ = _data(digits_cloud)
    clf = HybridClassifier(load(device_bundle), None, EscalationPolicy(1.0, 1.0))
    p = clf.predict(x[0])
    assert (p.degraded, p.reason) == (True, "unreachable")


def test_confident_inputs_never_touch_the_cloud(device_bundle: Path, digits_cloud, bad_cloud) -> None:
    x, _ = _data(digits_cloud)
    clf = _clf(device_bundle, bad_cloud.url, threshold=0.0)
    preds = [clf.predict(xi) for xi in x[:20]]
    clf.close()
    assert bad_cloud.posts == 0
    assert all(p.source == "device" and not p.degraded and p.reason == "confident" for p in preds)


def test_predict_batch_sends_only_the_unsure_ones_in_one_request(calibrated, cloud: str, digits_cloud) -> None:
    x, _ = _data(digits_cloud)
    clf = HybridClassifier.from_bundle(calibrated.bundle, cloud, "digits", deadline_ms=2000)
    batch = clf.predict_batch(x[:40])
    single = [clf.predict(xi) for xi in x[:40]]
    clf.close()
    assert [p.label for p in batch] == [p.label for p in single]
    assert [p.source for p in batch] == [p.source for p in single]
    assert any(p.source == "cloud" for p in batch)


def test_predict_batch_degrades_all_escalated_together(device_bundle: Path, digits_cloud, refused_url: str) -> None:
    x, _ = _data(digits_cloud)
    clf = _clf(device_bundle, refused_url)
    preds = clf.predict_batch(x[:8])
    clf.close()
    assert all(p.degraded and p.reason == "unreachable" and p.source == "device" for p in preds)


def test_a_failing_recorder_does_not_cost_the_answer(device_bundle: Path, digits_cloud, bad_cloud) -> None:
    class Broken:
        def record(self, **kw) -> None:
            raise OSError("disk full")

    x, _ = _data(digits_cloud)
    clf = _clf(device_bundle, bad_cloud.url, threshold=0.0, recorder=Broken())
    assert clf.predict(x[0]).source == "device"


def test_the_real_agent_recorder_counts_predictions(device_bundle: Path, digits_cloud, refused_url: str, tmp_path: Path) -> None:
    telemetry = pytest.importorskip("device_agents.telemetry")
    x, _ = _data(digits_cloud)
    rec = telemetry.Recorder(tmp_path / "agent", background=False, model_sha256="a" * 64, model_version="1")
    assert isinstance(rec, Recorder)
    clf = _clf(device_bundle, refused_url, recorder=rec, breaker=CircuitBreaker(BreakerConfig(consecutive_failures=2)))
    for xi in x[:5]:
        clf.predict(xi)
    clf.close()
    rec.close()
    points = rec.buffer.batch().points
    assert sum(p["count"] for p in points) == 5
    assert sum(p["degraded"] for p in points) == 5
    assert sum(p["escalations"] for p in points) == 5
    assert sum(p["errors"] for p in points) == 0  # degraded answers are answers, counted apart from errors


def test_a_cloud_client_that_raises_anything_still_gets_the_device_answer(device_bundle: Path, digits_cloud) -> None:
    from edgekit.runtime import load

    class Exploding:
        def infer(self, x, deadline):
            raise KeyError("surprise")

    class WrongRows:
        def infer(self, x, deadline):
            class R:
                outputs = np.zeros((len(x) + 1, 10), np.float32)
            return R()

    x, _ = _data(digits_cloud)
    for cloud in (Exploding(), WrongRows()):
        clf = HybridClassifier(load(device_bundle), cloud, EscalationPolicy(1.0, 1.000001))
        p = clf.predict(x[0])
        assert (p.source, p.degraded, p.reason) == ("device", True, "bad_response")


def test_the_manifest_policy_can_be_passed_as_is(calibrated, device_bundle: Path, digits_cloud) -> None:
    from edgekit.runtime import load

    clf = HybridClassifier(load(device_bundle), None, calibrated.policy)
    assert isinstance(clf.policy, EscalationPolicy) and clf.policy.threshold == calibrated.policy.threshold


def test_cloud_url_without_model_name_is_refused(calibrated) -> None:
    with pytest.raises(InputError, match="both"):
        HybridClassifier.from_bundle(calibrated.bundle, "http://127.0.0.1:1", None)
