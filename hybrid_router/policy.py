"""The escalation decision: a pure function of the device output and the policy.

The device model's output is turned into calibrated probabilities by temperature scaling,
``softmax(z / T)``. ``z`` is the logits when the device outputs logits. When it outputs
probabilities (an INT8 classifier with its softmax inside the model, as edgekit's bundles
are), ``z = log(max(p, floor))``: softmax of log-probabilities gives back ``p``, so scaling
the log-probabilities by ``1/T`` is exactly temperature scaling of the logits up to a
per-example constant, which softmax ignores. The floor keeps quantized zeros finite (an int8
softmax output has a step of 1/256; a zero means "below 1/512").

A score in [0, 1] says how sure the device is (higher: surer); the input is escalated when it
is below the threshold. Three scores (``SCORES``):

- ``max_softmax``: the top-1 calibrated probability.
- ``margin``: top-1 minus top-2 probability. On an INT8 softmax most answers saturate at
  255/256, where the top-1 probability cannot tell them apart, but the runner-up still can.
- ``entropy``: ``1 - H(p) / log(classes)``; it reads every class, so it has the most resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from edgekit.manifest import RouterPolicy

__all__ = ["SCORES", "Decision", "EscalationPolicy", "Score", "calibrated_probs", "decide", "decide_batch", "score"]

Score = Literal["max_softmax", "margin", "entropy"]
SCORES: tuple[Score, ...] = ("max_softmax", "margin", "entropy")


@dataclass(frozen=True)
class EscalationPolicy:
    """The few numbers the decision needs (a :class:`RouterPolicy` without its provenance)."""

    temperature: float
    threshold: float
    device_output: Literal["probabilities", "logits"] = "probabilities"
    probability_floor: float = 1e-6
    method: Score = "max_softmax"
    score_output: str | None = None
    classes: int | None = None
    device_model_sha256: str | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.threshold <= 1.000001:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")
        if self.method not in SCORES:
            raise ValueError(f"method must be one of {', '.join(SCORES)}, got {self.method!r}")

    @classmethod
    def from_router_policy(cls, policy: RouterPolicy) -> EscalationPolicy:
        """The decision part of a manifest's router policy."""
        return cls(policy.temperature, policy.threshold, policy.device_output, policy.probability_floor, policy.method,
                   policy.score_output, policy.classes, policy.device_model_sha256)


@dataclass(frozen=True)
class Decision:
    """What the device output says: the label, its score, its calibrated probabilities and whether to escalate."""

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


def score(probs: np.ndarray, method: str) -> np.ndarray:
    """The confidence score of calibrated probabilities (last axis = classes), in [0, 1]; higher is surer."""
    p = np.asarray(probs, dtype=np.float64)
    if method == "max_softmax":
        return p.max(axis=-1)
    if method == "margin":
        if p.shape[-1] < 2:
            return np.ones(p.shape[:-1])
        top2 = np.partition(p, p.shape[-1] - 2, axis=-1)[..., -2:]
        return top2[..., 1] - top2[..., 0]
    if method == "entropy":
        k = p.shape[-1]
        if k < 2:
            return np.ones(p.shape[:-1])
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)
        return np.clip(1.0 - h / np.log(k), 0.0, 1.0)
    raise ValueError(f"unknown score {method!r}; one of {', '.join(SCORES)}")


def decide(output: np.ndarray, policy: EscalationPolicy) -> Decision:
    """The decision for one example's device output (1-D)."""
    probs = calibrated_probs(output, policy.temperature, policy.device_output, policy.probability_floor)
    label = int(probs.argmax())
    conf = float(score(probs, policy.method))
    return Decision(label, conf, probs, conf < policy.threshold)


def decide_batch(outputs: np.ndarray, policy: EscalationPolicy) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised :func:`decide` for a batch: (labels, scores, probs, escalate mask)."""
    probs = calibrated_probs(outputs, policy.temperature, policy.device_output, policy.probability_floor)
    labels = probs.argmax(axis=-1)
    conf = score(probs, policy.method)
    return labels, conf, probs, conf < policy.threshold
