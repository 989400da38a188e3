"""Every failure answered: a misbehaving KServe cloud over real HTTP, and a device model that fails (issue 13.4, issue 15.3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import IncompatibleError
from hybrid_router import EscalationPolicy, HybridClassifier, KServeClient


class ListRecorder:
    """Keeps every record call (satisfies the Recorder protocol)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def record(self, **kw) -> None:
        self.calls.append(kw)


def _x(digits_cloud) -> np.ndarray:
    return np.load(digits_cloud["test"])["x"]


def _escalate_all(local, url: str, *, deadline_ms: float = 500, recorder=None) -> HybridClassifier:
    return HybridClassifier(local, KServeClient(url, "digits"), EscalationPolicy(1.0, 1.000001), deadline_ms=deadline_ms,
                            recorder=recorder)


@pytest.mark.parametrize("mode,reason", [
    ("classes20", "bad_response"), ("classes3", "bad_response"), ("huge", "bad_response"), ("huge_undeclared", "bad_response"),
    ("midbody_close", "unreachable"), ("nan", "bad_response"), ("huge_int", "bad_response"), ("huge_int_meta", "bad_response"),
    ("other_model", "bad_response"), ("other_output", "bad_response"), ("strings", "bad_response"), ("garbage", "bad_response"),
])
def test_a_misbehaving_cloud_gets_the_device_answer_degraded(device_bundle: Path, digits_cloud, bad_cloud, mode: str, reason: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    from edgekit.runtime import load

    bad_cloud.mode = mode
    x = _x(digits_cloud)
    local = load(device_bundle)
    clf = _escalate_all(local, bad_cloud.url)
    try:
        preds = [clf.predict(xi) for xi in x[:3]]
    finally:
        clf.close()
    device = local.predict(x[:3]).argmax(axis=1)
    assert [(p.source, p.degraded, p.reason, p.error) for p in preds] == [("device", True, reason, None)] * 3
    assert [p.label for p in preds] == list(device)
    assert bad_cloud.posts >= 1  # the cloud was asked and its answer refused
    assert not [r for r in caplog.records if r.exc_info]  # no traceback logged: every case is an expected failure


def test_huge_answers_are_refused_from_their_size_not_parsed(bad_cloud) -> None:
    import time

    from hybrid_router.client import CloudFailure

    for mode in ("huge", "huge_undeclared"):
        bad_cloud.mode = mode
        with KServeClient(bad_cloud.url, "digits", classes=10) as c, pytest.raises(CloudFailure) as e:
            c.infer(np.zeros((1, 8, 8, 1), np.float32), time.monotonic() + 30)
        assert e.value.reason == "bad_response"
        assert "bytes" in e.value.detail  # refused on the byte bound, before any JSON parsing


def test_a_cloud_model_with_another_class_count_is_never_asked(device_bundle: Path, digits_cloud, bad_cloud) -> None:
    from edgekit.runtime import load

    bad_cloud.meta_classes = 20
    clf = _escalate_all(load(device_bundle), bad_cloud.url)
    with pytest.raises(IncompatibleError, match="20 classes, the device model has 10"):
        clf.check_cloud()
    p = clf.predict(_x(digits_cloud)[0])
    clf.close()
    assert (p.source, p.degraded, p.reason) == ("device", True, "bad_response")
    assert bad_cloud.posts == 0  # its metadata ruled it out: no inference request was sent


class Raising:
    """A device model whose runtime fails (as a LiteRT delegate error would)."""

    def __init__(self, real) -> None:
        self.real = real
        self.manifest, self.inputs, self.outputs = real.manifest, real.inputs, real.outputs

    def predict(self, x: np.ndarray) -> np.ndarray:
        raise RuntimeError("delegate failed")


class NaNs(Raising):
    def predict(self, x: np.ndarray) -> np.ndarray:
        out = self.real.predict(x)
        out[:, 0] = np.nan
        return out


class WrongShape(Raising):
    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.real.predict(x)[:, :7]


@pytest.mark.parametrize("broken", [Raising, NaNs, WrongShape])
def test_a_failing_device_model_is_escalated(device_bundle: Path, digits_cloud, bad_cloud, broken) -> None:
    from edgekit.runtime import load

    rec = ListRecorder()
    clf = HybridClassifier(broken(load(device_bundle)), KServeClient(bad_cloud.url, "digits"), EscalationPolicy(1.0, 0.5),
                           recorder=rec)
    p = clf.predict(_x(digits_cloud)[0])
    clf.close()
    assert (p.source, p.label, p.reason, p.degraded, p.error, p.escalated) == ("cloud", 3, "device_error", False, None, True)
    assert rec.calls[0]["error"] is None and rec.calls[0]["source"] == "cloud"


@pytest.mark.parametrize("broken", [Raising, NaNs, WrongShape])
def test_device_and_cloud_both_failing_is_an_explicit_error_result(device_bundle: Path, digits_cloud, refused_url: str, broken) -> None:
    from edgekit.runtime import load

    rec = ListRecorder()
    clf = HybridClassifier(broken(load(device_bundle)), KServeClient(refused_url, "digits", classes=10), EscalationPolicy(1.0, 0.5),
                           recorder=rec)
    preds = clf.predict_batch(_x(digits_cloud)[:4])
    clf.close()
    assert all((p.ok, p.label, p.source, p.reason) == (False, -1, "none", "device_error") for p in preds)
    assert all(p.error.startswith("device: ") and p.error.endswith("cloud: unreachable") for p in preds)
    assert [c["error"] for c in rec.calls] == [p.error for p in preds]


def test_the_real_agent_recorder_counts_errors_apart_from_degraded(device_bundle: Path, digits_cloud, bad_cloud, refused_url: str,
                                                                   tmp_path: Path) -> None:
    telemetry = pytest.importorskip("device_agents.telemetry")
    from edgekit.runtime import load

    local = load(device_bundle)
    rec = telemetry.Recorder(tmp_path / "agent", background=False, model_sha256="a" * 64, model_version="1")
    x = _x(digits_cloud)
    bad_cloud.mode = "503"
    degraded = _escalate_all(local, bad_cloud.url, recorder=rec)
    failing = HybridClassifier(Raising(local), KServeClient(refused_url, "digits", classes=10), EscalationPolicy(1.0, 0.5),
                               recorder=rec)
    for xi in x[:3]:
        degraded.predict(xi)
    for xi in x[:2]:
        failing.predict(xi)
    degraded.close()
    failing.close()
    rec.close()
    points = rec.buffer.batch().points
    assert sum(p["count"] for p in points) == 5
    assert sum(p["degraded"] for p in points) == 3
    assert sum(p["errors"] for p in points) == 2


def test_a_trickling_answer_is_dropped_at_the_deadline(bad_cloud) -> None:
    """The worker stops reading at the deadline and closes the connection; it does not wait for the whole trickle."""
    import time

    from hybrid_router.client import CloudFailure

    bad_cloud.mode = "trickle"
    with KServeClient(bad_cloud.url, "digits", classes=10) as c:
        with pytest.raises(CloudFailure) as e:
            c.infer(np.zeros((1, 8, 8, 1), np.float32), time.monotonic() + 0.3)
        assert e.value.reason == "timeout"
        # a hang guard (the trickle takes ~6 s), not a timing bound: the server sees the client go away first
        assert bad_cloud.trickle_aborted.wait(5.0) and not bad_cloud.trickle_done.is_set()
