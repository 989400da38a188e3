"""Golden-set check: run a bundle's ``golden.npz`` inputs through a loaded model and compare
with the reference outputs the converter stored. The fleet server runs it on upload and the
device agent runs it on the real hardware before activation."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edgekit.bundle import Bundle
from edgekit.runtime import LocalModel

__all__ = ["GoldenCheck", "check_golden"]


@dataclass(frozen=True)
class GoldenCheck:
    """How a model's outputs on the golden inputs compare with the stored reference outputs."""

    count: int
    top1_agreement: float | None
    """Share of inputs whose arg-max equals the reference arg-max (None: no reference stored)."""
    max_abs_err: float | None
    min_top1_agreement: float
    atol: float
    reference: str
    """Which stored outputs were the reference: ``y_host`` (this model on the conversion host) or none."""

    @property
    def measurable(self) -> bool:
        return self.top1_agreement is not None

    @property
    def passed(self) -> bool:
        """Agreement at or above the manifest's threshold and every output within ``atol``."""
        if self.top1_agreement is None or self.max_abs_err is None:
            return False
        return self.top1_agreement >= self.min_top1_agreement and self.max_abs_err <= self.atol

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "measurable": self.measurable}


def check_golden(model: LocalModel, bundle: Bundle) -> GoldenCheck:
    """Predict the golden inputs one at a time (as a device does) and compare with ``y_host``."""
    golden = bundle.golden()
    g = bundle.manifest.golden
    ref = golden.get("y_host")
    xs = golden["x"]
    if ref is None:
        return GoldenCheck(len(xs), None, None, g.min_top1_agreement, g.atol, "none")
    out = np.concatenate([np.asarray(model.predict(xs[i:i + 1]), dtype=np.float32).reshape(1, -1) for i in range(len(xs))])
    ref = ref.reshape(len(xs), -1).astype(np.float32)
    if out.shape != ref.shape:
        return GoldenCheck(len(xs), 0.0, float("inf"), g.min_top1_agreement, g.atol, "y_host")
    agree = float(np.mean(out.argmax(1) == ref.argmax(1)))
    err = float(np.max(np.abs(out - ref))) if out.size else 0.0
    return GoldenCheck(len(xs), agree, err, g.min_top1_agreement, g.atol, "y_host")
