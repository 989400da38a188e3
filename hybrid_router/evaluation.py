"""``edgekit router eval``: run a calibrated bundle against a live cloud and count what happened.

Three accuracies on the same labelled data: device only (the bundle alone), cloud only (every
example sent to the cloud server in batches, when it answers), and hybrid (the router, one
example per call, each under its own deadline, exactly as an application would call it),
plus the escalation rate, how many answers were degraded and why, and per-call latency.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np

from edgekit.errors import RemoteError
from hybrid_router.breaker import BreakerConfig, CircuitBreaker
from hybrid_router.calibrate import load_labelled
from hybrid_router.classifier import HybridClassifier
from hybrid_router.client import CloudFailure, KServeClient

__all__ = ["evaluate_router"]


def _cloud_only(url: str, model: str, x: np.ndarray, y: np.ndarray, batch: int = 64, timeout_s: float = 10.0) -> tuple[float | None, str | None]:
    preds = []
    with KServeClient(url, model) as client:
        for i in range(0, len(x), batch):
            try:
                preds.append(client.infer(x[i : i + batch], time.monotonic() + timeout_s).outputs.argmax(axis=1))
            except CloudFailure as e:
                return None, e.reason
    return float((np.concatenate(preds) == y).mean()), None


def evaluate_router(bundle: Path, cloud_url: str, cloud_model: str, data: Path, *, deadline_ms: float = 200.0,
                    limit: int | None = None) -> dict:
    """The figures ``edgekit router eval`` prints, as a JSON-ready dict."""
    x, y, _ = load_labelled(data)
    if limit:
        x, y = x[:limit], y[:limit]
    breaker = CircuitBreaker(BreakerConfig())
    clf = HybridClassifier.from_bundle(bundle, cloud_url, cloud_model, deadline_ms=deadline_ms, breaker=breaker)
    try:
        try:
            clf.check_cloud()  # a cloud model the router cannot interpret is an error; one that is down is measured
        except RemoteError:
            pass
        device_acc = float((np.asarray(clf.local.predict(x)).argmax(axis=1) == y).mean())
        cloud_acc, cloud_err = _cloud_only(cloud_url, cloud_model, x, y)
        preds, latency = [], []
        for xi in x:
            t0 = time.perf_counter()
            preds.append(clf.predict(xi))
            latency.append((time.perf_counter() - t0) * 1000)
    finally:
        clf.close()
    labels = np.array([p.label for p in preds])
    escalated = sum(p.escalated for p in preds)
    degraded = [p for p in preds if p.degraded]
    lat = np.array(latency)
    policy = clf.policy
    return {
        "bundle": str(bundle), "cloud_url": cloud_url, "cloud_model": cloud_model, "data": str(data), "examples": int(len(x)),
        "deadline_ms": deadline_ms, "temperature": policy.temperature, "threshold": policy.threshold,
        "device_accuracy": device_acc, "cloud_accuracy": cloud_acc, "cloud_error": cloud_err,
        "hybrid_accuracy": float((labels == y).mean()),
        "escalation_rate": escalated / len(x), "answered_by_cloud": sum(p.source == "cloud" for p in preds),
        "degraded": len(degraded), "degraded_reasons": dict(Counter(p.reason for p in degraded)),
        "answered": len(preds), "breaker_state": breaker.state.value,
        "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)), "max": float(lat.max())},
        "max_over_deadline_ms": float(max(0.0, lat.max() - deadline_ms)),
    }
