"""Device-first prediction with cloud escalation, and the cloud model server.

``HybridClassifier`` runs the device model, escalates to a KServe v2 cloud model when its
temperature-scaled confidence is under the policy's threshold, and always answers: the device
answer flagged ``degraded`` when the cloud cannot help in time. Imports only edgekit core.
"""

from __future__ import annotations

from hybrid_router.breaker import BreakerConfig, BreakerSnapshot, BreakerState, CircuitBreaker
from hybrid_router.classifier import HybridClassifier, Prediction, Recorder
from hybrid_router.client import CloudFailure, CloudResult, KServeClient
from hybrid_router.policy import Decision, EscalationPolicy, calibrated_probs, decide, decide_batch

__all__ = [
    "BreakerConfig",
    "BreakerSnapshot",
    "BreakerState",
    "CircuitBreaker",
    "CloudFailure",
    "CloudResult",
    "Decision",
    "EscalationPolicy",
    "HybridClassifier",
    "KServeClient",
    "Prediction",
    "Recorder",
    "calibrated_probs",
    "decide",
    "decide_batch",
]
