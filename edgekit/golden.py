"""Golden-set check: run a bundle's ``golden.npz`` inputs through a loaded model and compare
with the reference outputs the converter stored. The fleet server runs it on upload and the
device agent runs it on the real hardware before activation.

``golden.npz`` keys follow the manifest's order: ``x``, ``x_1``, ... for the inputs and
``y_float``/``y_host``, ``y_float_1``/``y_host_1``, ... for the outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edgekit.bundle import Bundle
from edgekit.manifest import Manifest
from edgekit.runtime import LocalModel

__all__ = ["GoldenCheck", "check_golden", "golden_feeds", "golden_key", "golden_outputs"]


def golden_key(prefix: str, index: int) -> str:
    """``x``/``y_host``/``y_float`` for index 0, ``x_1``/``y_host_1``/... after."""
    return prefix if index == 0 else f"{prefix}_{index}"


def golden_feeds(golden: dict[str, np.ndarray], manifest: Manifest) -> dict[str, np.ndarray]:
    """The golden inputs keyed by the manifest's input names."""
    return {spec.name: golden[golden_key("x", i)] for i, spec in enumerate(manifest.inputs) if golden_key("x", i) in golden}


def golden_outputs(golden: dict[str, np.ndarray], manifest: Manifest, kind: str = "y_host") -> dict[str, np.ndarray] | None:
    """The stored reference outputs keyed by the manifest's output names (None when not stored)."""
    out = {spec.name: golden[golden_key(kind, j)] for j, spec in enumerate(manifest.outputs) if golden_key(kind, j) in golden}
    return out if len(out) == len(manifest.outputs) and out else None


@dataclass(frozen=True)
class GoldenCheck:
    """How a model's outputs on the golden inputs compare with the stored reference outputs."""

    count: int
    top1_agreement: float | None
    """Classification: share of inputs whose top-1 equals the reference's. Other tasks: share of
    inputs whose every output is within ``atol`` of the reference. None: no reference stored."""
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


def _class_axis(shape: tuple[int, ...]) -> int:
    axes = [i for i, d in enumerate(shape) if i > 0 and d != 1]
    return axes[0] if len(axes) == 1 else len(shape) - 1


def check_golden(model: LocalModel, bundle: Bundle) -> GoldenCheck:
    """Run the golden inputs one at a time (as a device does) and compare every output with ``y_host``."""
    golden = bundle.golden()
    m = bundle.manifest
    g = m.golden
    feeds = golden_feeds(golden, m)
    ref = golden_outputs(golden, m, "y_host")
    n = len(next(iter(feeds.values()))) if feeds else 0
    if ref is None or len(feeds) != len(m.inputs):
        return GoldenCheck(n, None, None, g.min_top1_agreement, g.atol, "none")
    single = len(m.inputs) == 1 and len(m.outputs) == 1
    rows: dict[str, list[np.ndarray]] = {name: [] for name in ref}
    for i in range(n):
        if single:  # the single-input call path a device app uses
            out = {m.outputs[0].name: model.predict(feeds[m.inputs[0].name][i : i + 1])}
        else:
            out = model.run({k: v[i : i + 1] for k, v in feeds.items()})
        for name in rows:
            rows[name].append(np.asarray(out[name]))
    got = {name: np.concatenate(parts) for name, parts in rows.items()}
    if any(got[k].shape != ref[k].shape for k in ref):
        return GoldenCheck(n, 0.0, float("inf"), g.min_top1_agreement, g.atol, "y_host")
    errs = {k: np.abs(got[k].astype(np.float64) - ref[k].astype(np.float64)).reshape(n, -1) for k in ref}
    err = max((float(e.max()) if e.size else 0.0) for e in errs.values())
    if m.task == "classification" and len(ref) == 1:
        (name,) = ref
        axis = _class_axis(ref[name].shape)
        top = lambda a: np.asarray(a).argmax(axis=axis).reshape(n, -1)[:, 0]  # noqa: E731
        agree = float(np.mean(top(got[name]) == top(ref[name])))
    else:
        within = np.all(np.stack([(e <= g.atol).all(axis=1) for e in errs.values()]), axis=0)
        agree = float(within.mean())
    return GoldenCheck(n, agree, err, g.min_top1_agreement, g.atol, "y_host")
