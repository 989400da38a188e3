"""Honest selection: recipes chosen on a selection split, figures reported on a test split, with 95% intervals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converters.selection import MIN_SPLIT_EXAMPLES, paired_drop_interval, split_evaluation, wilson_interval
from edgekit.manifest import Attempt, Manifest


def test_split_is_seeded_stratified_disjoint_and_complete() -> None:
    labels = np.repeat(np.arange(10), 40)[np.random.default_rng(3).permutation(400)]
    a, b = split_evaluation(400, labels), split_evaluation(400, labels)
    assert np.array_equal(a.selection, b.selection) and np.array_equal(a.test, b.test)  # seeded
    assert not set(a.selection) & set(a.test) and sorted([*a.selection, *a.test]) == list(range(400))
    assert a.stratified and not a.optimistic
    for cls in range(10):  # each class halved
        assert (labels[a.selection] == cls).sum() == 20 and (labels[a.test] == cls).sum() == 20
    assert "selection split of 200" in a.rule and "test split of 200" in a.rule and "stratified by label" in a.rule
    unlabeled = split_evaluation(301, None)
    assert not unlabeled.stratified and len(unlabeled.selection) + len(unlabeled.test) == 301


def test_small_eval_sets_are_chosen_and_measured_on_the_same_examples() -> None:
    s = split_evaluation(MIN_SPLIT_EXAMPLES - 1, np.zeros(MIN_SPLIT_EXAMPLES - 1, np.int64))
    assert s.optimistic and len(s.test) == MIN_SPLIT_EXAMPLES - 1
    assert s.rule.startswith(f"chosen and measured on the same {MIN_SPLIT_EXAMPLES - 1} examples (optimistic)")
    assert s.to_dict()["optimistic"] is True


def test_wilson_interval_reference_values() -> None:
    # 0 of 10: the upper bound is z^2 / (n + z^2) = 27.75%; 5 of 10: 23.66%..76.34% (Wilson 1927, as tabulated by Newcombe 1998).
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(27.753, abs=1e-3)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(23.659, abs=1e-3) and hi == pytest.approx(76.341, abs=1e-3)
    assert wilson_interval(0, 0) is None


def test_paired_drop_interval_counts_only_discordant_examples() -> None:
    both = np.ones(203, bool)
    lo, hi = paired_drop_interval(both, both)  # nothing discordant: not [0, 0]
    assert lo == pytest.approx(-hi) and hi == pytest.approx(1.96 / 205 * 100, abs=1e-2)
    f = np.ones(500, bool)
    q = f.copy()
    q[:5] = False  # 5 examples the quantized model loses
    extra = np.zeros(500, bool)
    extra[5:8] = True  # 3 it wins (float wrong there)
    f2 = f & ~extra
    lo, hi = paired_drop_interval(f2, q)
    assert lo < (5 - 3) / 500 * 100 < hi and lo < 0 < hi
    # Concordant examples do not move the centre: adding 1000 examples both get right only narrows it.
    lo2, hi2 = paired_drop_interval(np.r_[f2, np.ones(1000, bool)], np.r_[q, np.ones(1000, bool)])
    assert hi2 - lo2 < hi - lo


def test_report_says_selection_and_test_sizes_and_intervals(digits_bundles) -> None:
    report = json.loads((digits_bundles.out / "report.json").read_text())
    split = report["evaluation_split"]
    assert split["total"] == 400 and split["selection_examples"] + split["test_examples"] == 400
    assert split["stratified"] and not split["optimistic"] and "Wilson" in split["intervals"]
    md = (digits_bundles.out / "report.md").read_text()
    assert f"selection split of {split['selection_examples']} examples" in md and f"test split of {split['test_examples']} examples" in md
    for r in report["results"]:
        chosen = next(a for a in r["attempts"] if a["chosen"])
        sel, test = chosen["selection"], chosen["test"]
        assert (sel["split"], sel["examples"], test["split"], test["examples"]) == (
            "selection", split["selection_examples"], "test", split["test_examples"])
        assert chosen["within_budget"] is sel["within_budget"] is True  # the decision is the selection split's
        assert chosen["accuracy"] == test["accuracy"] and chosen["accuracy_drop"] == test["accuracy_drop"]  # the report is the test split's
        lo, hi = test["accuracy_ci95"]
        assert lo <= test["accuracy"] <= hi
        dlo, dhi = test["accuracy_drop_ci95"]
        assert dlo <= test["accuracy_drop"] <= dhi and dlo < dhi
        m = r["metrics"]
        assert m["int8_accuracy_ci95_low"]["value"] == lo and m["int8_accuracy_ci95_high"]["value"] == hi
        assert m["test_examples"]["value"] == split["test_examples"] and m["selection_examples"]["value"] == split["selection_examples"]
        assert "test split" in m["int8_accuracy"]["note"]
        # The reported float accuracy is the test split's, so the drop is float minus int8 on the same examples.
        assert m["accuracy_drop"]["value"] == pytest.approx(m["float_accuracy"]["value"] - m["int8_accuracy"]["value"])
    for r in digits_bundles.results:
        assert r.manifest.quantization.evaluation_split is not None and r.manifest.quantization.evaluation_split.test_examples == split["test_examples"]
        assert any("selection split" in v and "never saw" in v for v in r.verification)


def test_small_eval_set_is_reported_as_optimistic_in_cli_json(digits, tmp_path: Path, run_cli) -> None:
    small = tmp_path / "small.npz"
    with np.load(digits["eval"]) as d:
        np.savez(small, x=d["x"][:120], y=d["y"][:120])
    code, out, _ = run_cli("convert", digits["model"], "--profile", "x86-64-avx512-server", "--format", "onnx", "--calibration", digits["calib"],
                           "--eval", small, "--out", tmp_path / "b", "--latency-runs", "5", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["evaluation_split"]["optimistic"] is True
    assert data["evaluation_split"]["rule"].startswith("chosen and measured on the same 120 examples (optimistic)")
    (r,) = data["results"]
    timed = [a for a in r["attempts"] if a["latency_ms_p50"] is not None]
    assert timed
    for a in timed:  # per attempt: host latency with runtime/EP/threads named, speedup, budget, both splits
        assert a["latency_ms_p50"] > 0 and a["float_latency_ms_p50"] > 0 and a["speedup_vs_float"] > 0
        assert "ONNX Runtime" in a["latency_host"] and "1 thread" in a["latency_host"] and "ExecutionProvider" in a["latency_host"]
        assert a["within_budget"] in (True, False)
        assert a["selection"]["split"] == a["test"]["split"] == "same" and a["test"]["examples"] == 120
    manifest = json.loads((Path(r["bundle"]) / "manifest.json").read_text())
    assert manifest["quantization"]["evaluation_split"]["optimistic"] is True
    assert any("optimistic" in v for v in manifest["verification"])


def test_old_manifests_without_the_new_fields_still_load(digits_bundles) -> None:
    data = json.loads((digits_bundles.results[0].bundle_dir / "manifest.json").read_text())
    new = set(Attempt.model_fields) - {"recipe", "description", "size_bytes", "accuracy", "accuracy_drop", "agreement", "min_sqnr_db", "metric",
                                       "within_budget", "error", "skipped", "chosen"}
    assert {"latency_ms_p50", "speedup_vs_float", "selection", "test", "slower_than_float"} <= new
    data["quantization"].pop("evaluation_split")
    data["quantization"]["attempts"] = [{k: v for k, v in a.items() if k not in new} for a in data["quantization"]["attempts"]]
    old = Manifest.model_validate(data)
    assert old.quantization.evaluation_split is None
    assert all(a.selection is None and a.latency_ms_p50 is None for a in old.quantization.attempts)
    assert sum(a.chosen for a in old.quantization.attempts) == 1
