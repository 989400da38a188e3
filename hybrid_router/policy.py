"""The escalation decision: a pure function of the device output and the policy.

The device model's output is turned into calibrated probabilities by temperature scaling,
``softmax(z / T)``. ``z`` is the logits when the device outputs logits. When it outputs
probabilities (an INT8 classifier with its softmax inside the model, as edgekit's bundles
are), ``z = log(max(p, floor))``: softmax of log-probabilities gives back ``p``, so scaling
the log-probabilities by ``1/T`` is exactly temperature scaling of the logits up to a
per-example constant, which softmax ignores. The floor keeps quantized zeros finite (an int8
softmax output has a step of 1/256; a zero means "below 1/512").

The input is escalated when the top-1 calibrated probability is below the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from edgekit.manifest import RouterPolicy

__all__ = ["Decision", "EscalationPolicy", "calibrated_probs", "decide", "decide_batch"]


@dataclass(frozen=True)
class EscalationPolicy:
    """The few numbers the decision needs (a :class:`RouterPolicy` without its provenance)."""

    temperature: float
    threshold: float
    device_output: Literal["probabilities", "logits"] = "probabilities"
    probability_floor: float = 1e-6

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.threshold <= 1.000001:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")

    @classmethod
    def from_router_policy(cls, policy: RouterPolicy) -> EscalationPolicy:
        """The decision part of a manifest's router policy."""
        return cls(policy.temperature, policy.threshold, policy.device_output, policy.probability_floor)


@dataclass(frozen=True)
class Decision:
    """What the device output says: the label, its calibrated probabilities and whether to escalate."""

    label: int
    confidence: float
    probs: np.ndarray
    escalate: bool


def calibrated_probs(outputs: np.ndarray, temperature: float, device_output: str = "probabilities",
                     probability_floor: float = 1e-6) -> np.ndarray:
    """Temperature-scaled softmax over the last axis of device outputs (one example or a batch)."""
    z = np.asarray(outputs, dtype=np.float64)
    if device_output == "probabilities":
        z = np.log(np.maximum(z, probability_floor))
    z = z / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def decide(output: np.ndarray, policy: EscalationPolicy) -> Decision:
    """The decision for one example's device output (1-D)."""
    probs = calibrated_probs(output, policy.temperature, policy.device_output, policy.probability_floor)
    label = int(probs.argmax())
    conf = float(probs[label])
    return Decision(label, conf, probs, conf < policy.threshold)


def decide_batch(outputs: np.ndarray, policy: EscalationPolicy) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised :func:`decide` for a batch: (labels, confidences, probs, escalate mask)."""
    probs = calibrated_probs(outputs, policy.temperature, policy.device_output, policy.probability_floor)
    labels = probs.argmax(axis=-1)
    conf = np.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
    return labels, conf, probs, conf < policy.threshold
