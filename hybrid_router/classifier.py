"""HybridClassifier: the device model first, the cloud when the device is unsure, an answer always.

Whatever the cloud does (refuses, hangs, sheds load, answers garbage, or the breaker is
open), ``predict`` returns the device's answer flagged ``degraded`` with the reason, no later
than the deadline plus the time to build the answer. The deadline counts from the call.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from edgekit.errors import InputError
from edgekit.manifest import RouterPolicy
from hybrid_router.breaker import BreakerState, CircuitBreaker
from hybrid_router.client import CloudFailure, KServeClient
from hybrid_router.policy import EscalationPolicy, decide, decide_batch

__all__ = ["CloudModel", "DeviceModel", "HybridClassifier", "Prediction", "Recorder"]

log = logging.getLogger(__name__)

Source = Literal["device", "cloud"]


@runtime_checkable
class Recorder(Protocol):
    """Anything that records predictions (``device_agents.telemetry.Recorder`` fits)."""

    def record(self, *, latency_ms: float, confidence: float, source: str, error: str | None, escalated: bool, degraded: bool) -> None:
        """Record one prediction."""


class DeviceModel(Protocol):
    """The on-device model: float batch in, float batch out (``edgekit.runtime.LocalModel`` fits)."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Outputs for a batch."""


class CloudModel(Protocol):
    """The cloud side: a batch and an absolute ``time.monotonic()`` deadline in, outputs out (``KServeClient`` fits)."""

    def infer(self, x: np.ndarray, deadline: float):
        """A result with ``.outputs``; raises ``CloudFailure`` on any failure."""


@dataclass(frozen=True)
class Prediction:
    """One answer. ``reason``: ``confident`` or ``escalated`` when all went well, else why it is degraded."""

    label: int
    probs: np.ndarray
    source: Source
    degraded: bool
    reason: str
    latency_ms: float
    confidence: float
    escalated: bool


def _as_probs(out: np.ndarray) -> np.ndarray:
    """Cloud outputs as probabilities: kept when they already are, softmaxed when they look like logits."""
    out = np.asarray(out, dtype=np.float64)
    if out.min() >= 0 and abs(out.sum() - 1.0) < 1e-3:
        return out
    e = np.exp(out - out.max())
    return e / e.sum()


class HybridClassifier:
    """Device-first classification with escalation to a KServe v2 cloud model under a deadline and a breaker."""

    def __init__(self, local: DeviceModel, cloud: CloudModel | None, policy: EscalationPolicy | RouterPolicy, *,
                 deadline_ms: float = 100.0, breaker: CircuitBreaker | None = None, recorder: Recorder | None = None) -> None:
        if deadline_ms <= 0:
            raise ValueError("deadline_ms must be > 0")
        self.local = local
        self.cloud = cloud
        self.policy = EscalationPolicy.from_router_policy(policy) if isinstance(policy, RouterPolicy) else policy
        self.deadline_ms = float(deadline_ms)
        self.breaker = breaker or CircuitBreaker()
        self.recorder = recorder

    @classmethod
    def from_bundle(cls, bundle_path: str | os.PathLike[str], cloud_url: str | None = None, cloud_model: str | None = None, *,
                    deadline_ms: float = 100.0, breaker: CircuitBreaker | None = None, recorder: Recorder | None = None,
                    num_threads: int | None = None) -> HybridClassifier:
        """Load a calibrated bundle (policy from its manifest) and connect to the cloud model, if given."""
        from edgekit.runtime import load

        local = load(bundle_path, num_threads=num_threads)
        policy = local.manifest.router_policy if local.manifest is not None else None
        if policy is None:
            raise InputError(f"{bundle_path}: the bundle has no router policy", "Calibrate it first: edgekit router calibrate --device BUNDLE ...")
        if (cloud_url is None) != (cloud_model is None):
            raise InputError("give both cloud_url and cloud_model, or neither", "E.g. cloud_url='http://127.0.0.1:8500', cloud_model='mnist'.")
        cloud = KServeClient(cloud_url, cloud_model) if cloud_url and cloud_model else None
        return cls(local, cloud, EscalationPolicy.from_router_policy(policy), deadline_ms=deadline_ms, breaker=breaker, recorder=recorder)

    def close(self) -> None:
        """Close the cloud client's connections."""
        if hasattr(self.cloud, "close"):
            self.cloud.close()

    def predict(self, x: np.ndarray) -> Prediction:
        """The answer for one example (no batch axis)."""
        start = time.monotonic()
        deadline = start + self.deadline_ms / 1000.0
        out = np.asarray(self.local.predict(np.asarray(x, dtype=np.float32)[None]))[0]
        d = decide(out, self.policy)
        if not d.escalate:
            return self._finish(Prediction(d.label, d.probs, "device", False, "confident", 0.0, d.confidence, False), start)
        cloud_out, reason = self._escalate(np.asarray(x, dtype=np.float32)[None], deadline)
        if cloud_out is None:
            return self._finish(Prediction(d.label, d.probs, "device", True, reason, 0.0, d.confidence, True), start)
        probs = _as_probs(cloud_out[0])
        return self._finish(Prediction(int(probs.argmax()), probs, "cloud", False, "escalated", 0.0, d.confidence, True), start)

    def predict_batch(self, xs: np.ndarray) -> list[Prediction]:
        """Answers for a batch; the unsure examples go to the cloud in one request under one deadline."""
        start = time.monotonic()
        deadline = start + self.deadline_ms / 1000.0
        xs = np.asarray(xs, dtype=np.float32)
        labels, conf, probs, esc = decide_batch(np.asarray(self.local.predict(xs)), self.policy)
        idx = np.flatnonzero(esc)
        cloud_out, reason = self._escalate(xs[idx], deadline) if len(idx) else (None, "")
        answers: list[Prediction] = []
        for i in range(len(xs)):
            if not esc[i]:
                answers.append(Prediction(int(labels[i]), probs[i], "device", False, "confident", 0.0, float(conf[i]), False))
            elif cloud_out is None:
                answers.append(Prediction(int(labels[i]), probs[i], "device", True, reason, 0.0, float(conf[i]), True))
            else:
                p = _as_probs(cloud_out[int(np.searchsorted(idx, i))])
                answers.append(Prediction(int(p.argmax()), p, "cloud", False, "escalated", 0.0, float(conf[i]), True))
        return [self._finish(a, start) for a in answers]

    def _escalate(self, x: np.ndarray, deadline: float) -> tuple[np.ndarray | None, str]:
        """Cloud outputs, or None and the reason the device answer stands."""
        if self.cloud is None:
            return None, "unreachable"
        if not self.breaker.allow():
            return None, "circuit_open"
        try:
            result = self.cloud.infer(x, deadline)
            outputs = np.asarray(result.outputs)
            if outputs.ndim < 2 or len(outputs) != len(x):
                raise CloudFailure("bad_response", f"outputs of shape {outputs.shape} for {len(x)} inputs")
        except CloudFailure as e:
            self.breaker.record_failure()
            log.debug("cloud failed: %s", e)
            return None, e.reason
        except Exception:  # noqa: BLE001 - whatever the cloud side does, the caller gets the device answer
            self.breaker.record_failure()
            log.exception("cloud client raised unexpectedly; answering from the device")
            return None, "bad_response"
        self.breaker.record_success()
        return outputs, ""

    def _finish(self, p: Prediction, start: float) -> Prediction:
        latency = (time.monotonic() - start) * 1000.0
        p = replace(p, latency_ms=latency)
        if self.recorder is not None:
            try:
                self.recorder.record(latency_ms=latency, confidence=p.confidence, source=p.source,
                                     error=p.reason if p.degraded else None, escalated=p.escalated, degraded=p.degraded)
            except Exception:  # noqa: BLE001 - telemetry must never cost the caller its answer
                log.exception("recorder failed; prediction returned anyway")
        return p

    @property
    def breaker_state(self) -> BreakerState:
        """The circuit breaker's state."""
        return self.breaker.state
