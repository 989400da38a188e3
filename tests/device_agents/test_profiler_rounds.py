"""The profiler times candidate and baseline in interleaved rounds; p95 is the median of the rounds, and the
``max_p95_ratio`` gate compares the medians (one slow round does not fail a 1.5x gate)."""

from __future__ import annotations

import statistics
from pathlib import Path

from device_agents.profiler import ProfileSettings, _split, profile_candidate
from fleet_server.services.gates import evaluate_device_gates
from fleet_server.tables import RolloutDevice


def test_split_keeps_the_run_count() -> None:
    assert _split(200, 5) == [40] * 5
    assert _split(12, 5) == [3, 3, 2, 2, 2] and sum(_split(12, 5)) == 12
    assert _split(3, 5) == [1, 1, 1]  # never more rounds than runs
    assert _split(1, 1) == [1]


def test_identical_model_is_gated_on_the_medians_of_its_rounds(bundles: dict[str, Path]) -> None:
    """A real profile of one model against itself: structure only (no timing threshold: this box is shared and noisy)."""
    s = ProfileSettings(runs=100, budget_s=5.0, warmup=5, rounds=5)
    m = profile_candidate(bundles["pi_b"], bundles["pi"], "a" * 64, s)  # the same model file, re-signed as 1.3.0
    assert m["rounds"] == 5 and len(m["p95_rounds_ms"]) == 5
    assert m["p95_ms"] == statistics.median(m["p95_rounds_ms"])
    assert m["runs"] <= s.runs  # the rounds split the run count, they do not multiply it
    base = m["baseline"]
    assert base["sha256"] == "a" * 64 and len(base["p95_rounds_ms"]) == 5
    assert base["p95_ms"] == statistics.median(base["p95_rounds_ms"])
    assert m["golden_passed"] and m["peak_rss_mb"] >= 0

    rd = RolloutDevice(device_id="dev-1", finished=True, phase="activated", metrics=m)
    (gate,) = [g for g in evaluate_device_gates({"max_p95_ratio": 1.5}, [rd]) if g["gate"] == "max_p95_ratio"]
    assert gate["note"] == "median of 5 rounds vs median of 5 baseline rounds"
    assert gate["value"] == m["p95_ms"] / base["p95_ms"]
    assert gate["passed"] is (gate["value"] <= 1.5)  # whether it passes is the machine's load; that it reads the medians is not


def test_gate_on_rounds_ignores_one_slow_round() -> None:
    """Made-up profile figures (no timing): one slow candidate round does not move the median, so the gate passes."""
    m = {"p95_ms": 1.0, "p95_rounds_ms": [1.0, 1.1, 9.0, 0.9, 1.0], "timing_source": "measured",
         "baseline": {"p95_ms": 1.0, "p95_rounds_ms": [1.0, 1.0, 1.1, 0.9, 1.0]}}
    rd = RolloutDevice(device_id="dev-1", finished=True, phase="activated", metrics=m)
    (gate,) = evaluate_device_gates({"max_p95_ratio": 1.5}, [rd])
    assert gate["passed"] is True and gate["value"] == 1.0
    old = {"p95_ms": 2.0, "baseline": {"p95_ms": 1.0}}  # an older agent: one figure each
    (gate,) = evaluate_device_gates({"max_p95_ratio": 1.5}, [RolloutDevice(device_id="d", finished=True, phase="activated", metrics=old)])
    assert gate["passed"] is False and gate["value"] == 2.0 and "no rounds" in gate["note"]
    bad = {**m, "baseline": {"p95_ms": 1.0, "p95_rounds_ms": ["x", None]}}  # malformed rounds: the single figures
    (gate,) = evaluate_device_gates({"max_p95_ratio": 1.5}, [RolloutDevice(device_id="d", finished=True, phase="activated", metrics=bad)])
    assert gate["value"] == 1.0 and "no rounds" in gate["note"]
