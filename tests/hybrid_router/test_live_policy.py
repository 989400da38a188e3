"""Live policy: a HybridClassifier on the agent's active model follows its switches, model and policy together, under load."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import InputError
from hybrid_router import HybridClassifier


@pytest.fixture(scope="module")
def strict(device_bundle: Path, digits_cloud, tmp_path_factory: pytest.TempPathFactory):
    """The same device model calibrated for a much smaller escalation budget (another policy, another bundle)."""
    from hybrid_router.calibrate import calibrate_router

    return calibrate_router(device_bundle, digits_cloud["onnx"], digits_cloud["calib"], tmp_path_factory.mktemp("strict"),
                            escalation_budget=0.02)


def _install(data_dir: Path, bundle: Path) -> dict:
    from device_agents.install import install_local
    from device_agents.settings import AgentSettings

    result = install_local(data_dir, bundle, AgentSettings(insecure_any_publisher=True))
    assert result["ok"], result
    return result


def test_switches_are_followed_between_requests_under_load(calibrated, strict, device_bundle: Path, digits_cloud, cloud: str,
                                                           tmp_path: Path) -> None:
    x = np.load(digits_cloud["test"])["x"]
    data = tmp_path / "agent"
    first = _install(data, calibrated.bundle)
    clf = HybridClassifier.from_active(data, cloud, "digits", deadline_ms=2000, check_interval_s=0.0)
    assert clf.policy.threshold == calibrated.policy.threshold
    seen: list[tuple[str | None, float | None, bool, float, float]] = []  # sha, threshold, ok, started, answered
    failures: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            try:
                started = time.monotonic()
                p = clf.predict(x[i % len(x)])
                seen.append((p.model_sha256, clf.policy.threshold if clf.policy else None, p.ok, started, time.monotonic()))
            except BaseException as e:  # noqa: BLE001 - the test reports it
                failures.append(e)
                return
            i += 1

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        second = _install(data, strict.bundle)  # the agent switches while three threads predict
        give_up = time.monotonic() + 120  # a hang guard, not a performance bound
        while not any(s[0] == second["sha256"] for s in seen) and not failures and time.monotonic() < give_up:
            time.sleep(0.05)
        first_new = min(s[4] for s in seen if s[0] == second["sha256"])
        while sum(s[3] > first_new for s in seen) < 30 and not failures and time.monotonic() < give_up:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        clf.close()
    assert not failures
    assert all(s[2] for s in seen)
    shas = [s[0] for s in seen]
    assert shas[0] == first["sha256"] and second["sha256"] in shas
    assert clf.policy.threshold == strict.policy.threshold != calibrated.policy.threshold
    assert clf.model_sha256 == second["sha256"]
    # Once one request has been answered by the new model, no request that starts later goes back to the old one
    # (a request that started before the switch may still finish on the old model, after others: it was routed then).
    later = [s[0] for s in seen if s[3] > first_new]
    assert len(later) >= 30 and set(later) == {second["sha256"]}


def test_a_switch_to_a_model_without_policy_never_escalates(calibrated, device_bundle: Path, digits_cloud, bad_cloud,
                                                           tmp_path: Path) -> None:
    x = np.load(digits_cloud["test"])["x"]
    data = tmp_path / "agent"
    _install(data, calibrated.bundle)
    clf = HybridClassifier.from_active(data, bad_cloud.url, "digits", check_interval_s=0.0)
    _install(data, device_bundle)
    preds = [clf.predict(xi) for xi in x[:10]]
    clf.close()
    assert clf.policy is None
    assert all((p.source, p.degraded, p.reason, p.escalated) == ("device", True, "no_policy", False) for p in preds)
    assert bad_cloud.posts == 0


def test_a_policy_from_another_model_is_refused(calibrated, device_bundle: Path) -> None:
    from edgekit.runtime import load

    local = load(device_bundle)
    other = calibrated.policy.model_copy(update={"device_model_sha256": "0" * 64})
    with pytest.raises(InputError, match="calibrated for device model 000000000000"):
        HybridClassifier(local, None, other)
    with pytest.raises(InputError, match="for 12 classes, the device model has 10"):
        HybridClassifier(local, None, calibrated.policy.model_copy(update={"classes": 12}))
