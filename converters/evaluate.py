"""Numbers measured on this host: accuracy, agreement with the float model, latency."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edgekit.runtime import LocalModel

__all__ = ["Agreement", "compare", "latency_ms"]


@dataclass(frozen=True)
class Agreement:
    """A quantized model's outputs compared with the float model's on the same inputs."""

    accuracy: float | None  # percent, when labels are known
    agreement: float  # percent of top-1 equal to the float model's top-1
    max_abs_error: float

    def drop_from(self, float_accuracy: float | None) -> float:
        """Accuracy lost in points; without labels, the disagreement rate, which bounds it."""
        if self.accuracy is not None and float_accuracy is not None:
            return float_accuracy - self.accuracy
        return 100.0 - self.agreement


def accuracy(outputs: np.ndarray, y: np.ndarray | None) -> float | None:
    """Top-1 accuracy in percent, or None without labels."""
    if y is None:
        return None
    return float((outputs.argmax(axis=-1) == y).mean() * 100.0)


def compare(outputs: np.ndarray, float_outputs: np.ndarray, y: np.ndarray | None) -> Agreement:
    """Accuracy, top-1 agreement and largest absolute error against the float outputs."""
    agree = float((outputs.argmax(axis=-1) == float_outputs.argmax(axis=-1)).mean() * 100.0)
    return Agreement(accuracy(outputs, y), agree, float(np.abs(outputs - float_outputs).max()))


def latency_ms(model: LocalModel, x_one: np.ndarray, runs: int, warmup: int = 5) -> np.ndarray:
    """Per-call latencies of ``model.predict`` on one batch-1 input, in milliseconds."""
    for _ in range(warmup):
        model.predict(x_one)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        model.predict(x_one)
        times[i] = time.perf_counter() - t0
    return times * 1e3
