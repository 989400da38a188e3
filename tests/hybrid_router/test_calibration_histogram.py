"""Calibration stores the confidence histogram of its threshold data in the policy, binned as device telemetry bins it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from device_agents.telemetry import Recorder
from edgekit.bundle import open_bundle
from edgekit.manifest import ConfidenceHistogram
from hybrid_router.calibrate import confidence_histogram


def test_calibration_writes_the_histogram_into_the_signed_bundle(calibrated) -> None:
    h = calibrated.policy.confidence_histogram
    assert h is not None and len(h.counts) == 10 and h.edges == [i / 10 for i in range(11)]
    assert sum(h.counts) == calibrated.policy.threshold_samples  # every threshold example, once
    assert open_bundle(calibrated.bundle).manifest.router_policy.confidence_histogram == h


def test_bins_line_up_with_the_telemetry_recorder(tmp_path: Path) -> None:
    conf = np.array([0.0, 0.05, 0.1, 0.3, 0.29999999, 0.7, 0.7000001, 0.95, 0.999, 1.0, 0.6, 0.2, 0.5], dtype=np.float32)
    with Recorder(tmp_path, model_sha256="a" * 64, model_version="1", background=False) as rec:
        for c in conf:
            rec.record(latency_ms=1.0, confidence=float(c), at=600.0)
        rec.flush(include_current=True)
        (point,) = rec.buffer.batch().points
    assert confidence_histogram(conf).counts == point["confidence_hist"]


@pytest.mark.parametrize("bad", [
    {"edges": [0.0, 0.5, 1.0], "counts": [1]},  # counts do not match the edges
    {"edges": [0.0, 0.5, 0.5, 1.0], "counts": [1, 1, 1]},  # edges must rise
    {"edges": [0.0, 1.5], "counts": [1]},  # outside [0, 1]
    {"edges": [0.0, float("nan")], "counts": [1]},
    {"edges": [0.0, 1.0], "counts": [-1]},
    {"edges": [i / 51 for i in range(52)], "counts": [1] * 51},  # over 50 bins
])
def test_bad_histograms_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        ConfidenceHistogram.model_validate(bad)
