"""Speed is part of the budget: candidates timed on this host, the fastest within budget wins, slowdowns explained.

No timing thresholds: the tests check the structure of what was measured (the chosen candidate is the
fastest within budget modulo the documented tolerance; a slower-than-float candidate carries a
reason built from the runtime's placement), never how fast anything ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from converters.coverage_runtime import litert_xnnpack_placement, ort_node_providers
from converters.pipeline import ConvertOptions, run_convert
from converters.speed import (
    DISPLACE_TOLERANCE,
    FIDELITY_MARGIN_DB,
    TIMING_THREADS,
    displaces,
    early_stop_reason,
    fidelity_sibling,
    graph_key,
    host_runtime,
    load_for_timing,
    measure_speed,
    slowdown_reason,
    speed_class,
)
from edgekit.profiles import find_profile

ROOT = Path(__file__).resolve().parents[2]


def _graph_keys(model: Path, profile: str, calib: Path, tmp_path: Path) -> dict[str, tuple]:
    """Recipe name -> graph_key for the TFLite recipes the search offers this source on this profile (check() sets what it offers)."""
    from converters.source import load_source
    from converters.tflite import TFLiteConverter

    source, prof, conv = load_source(model, tmp_path), find_profile(profile), TFLiteConverter()
    conv.check(source, prof)
    count = len(next(iter(np.load(calib).values())))
    return {r.name: graph_key(r) for r in conv.recipes(prof, count, ConvertOptions.calibration_samples)}


def _check_fastest_wins(attempts, keys: dict[str, tuple]) -> None:
    """The chosen attempt is within budget and no timed within-budget attempt is more than the tolerance faster than its graph.

    Recipes that build the same graph run at the same speed; their timings differ by noise. A bias-corrected variant kept
    for fidelity over a same-graph recipe (converters.search) may have timed slower than it: its graph's speed is the
    fastest within-budget timing of that graph.
    """
    chosen = next(a for a in attempts if a.chosen)
    within = [a for a in attempts if a.within_budget and a.speedup_vs_float is not None]
    assert chosen in within
    ratio = lambda a: 1.0 / a.speedup_vs_float
    of_graph = min(ratio(a) for a in within if keys[a.recipe] == keys[chosen.recipe])
    assert of_graph <= (1 + DISPLACE_TOLERANCE) * min(ratio(a) for a in within) + 1e-12
    for a in attempts:
        if a.latency_ms_p50 is not None and 1.0 / a.speedup_vs_float > 1 + DISPLACE_TOLERANCE:
            assert a.slower_than_float and "float model's latency" in a.slower_than_float  # measured reason, always
        if a.skipped and ("early stop" in a.skipped or "same graph" in a.skipped):
            assert a.latency_ms_p50 is None and a.accuracy is None  # skipped means not built


def _int16_profile(tmp_path: Path) -> Path:
    """The x86 server profile, except that its XNNPACK accelerator claims 16x8 kernels (so the int16x8 recipe is offered)."""
    data = yaml.safe_load((ROOT / "hardware_profiles" / "x86-64-avx512-server.yaml").read_text())
    data["id"] = "test-int16-kernels"
    for acc in data["accelerators"]:
        if acc["id"] == "xnnpack":
            acc["int16x8_kernels"] = True
            acc["int16x8_source"] = "test profile: claims 16x8 kernels so the search offers int16x8"
    path = tmp_path / "test-int16-kernels.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_chosen_is_the_fastest_within_budget_and_speed_is_in_every_attempt(digits_bundles, digits, tmp_path: Path) -> None:
    for r in digits_bundles.results:
        _check_fastest_wins(r.attempts, _graph_keys(digits["model"], r.profile, digits["calib"], tmp_path / r.profile))
        m = r.manifest.metrics
        chosen = next(a for a in r.attempts if a.chosen)
        assert m["host_latency_ms_p50"].value == chosen.latency_ms_p50 and m["latency_ratio"].value == pytest.approx(1 / chosen.speedup_vs_float)
        assert "1 thread" in m["host_latency_ms_p50"].note and "XNNPACK" in m["host_latency_ms_p50"].note
        assert not any("per-call overhead dominates" in w for w in r.warnings)  # the unmeasured excuse is gone
    report = json.loads((digits_bundles.out / "report.json").read_text())
    for r in report["results"]:
        for a in r["attempts"]:
            assert {"latency_ms_p50", "speedup_vs_float", "latency_host", "within_budget", "selection", "test", "speed_class"} <= set(a)


def test_int16x8_that_would_pass_is_not_chosen_over_int8(digits, tmp_path: Path) -> None:
    """A profile with 16x8 kernels, a budget every recipe meets: int16x8 is offered, and the int8 winner stops the search before it."""
    profile = _int16_profile(tmp_path)
    opts = ConvertOptions(model=digits["model"], profiles=(str(profile),), formats=("tflite",), calibration=digits["calib"],
                          eval=digits["eval"], out=tmp_path / "out", max_accuracy_drop=50.0, latency_runs=10)
    (r,) = run_convert(opts).results
    by_name = {a.recipe: a for a in r.attempts}
    assert "int16x8" in by_name and by_name["int16x8"].speed_class == "int16x8"
    assert by_name["int16x8"].skipped and "int16x8 graphs are never faster than int8 ones" in by_name["int16x8"].skipped
    chosen = next(a for a in r.attempts if a.chosen)
    assert chosen.speed_class == "int8" and r.manifest.quantization.precision.startswith("INT8")
    _check_fastest_wins(r.attempts, _graph_keys(digits["model"], str(profile), digits["calib"], tmp_path / "keys"))
    assert [a.speed_class for a in r.attempts] == sorted((a.speed_class for a in r.attempts), key=["int8", "mixed", "int16x8"].index)


def test_int16x8_is_offered_only_where_an_accelerator_has_16x8_kernels(tmp_path: Path) -> None:
    from converters.tflite import TFLiteConverter

    conv = TFLiteConverter()
    for pid in ("raspberry-pi-5", "pixel-8", "x86-64-avx512-server", "coral-edgetpu", "iphone-15-pro", "jetson-orin-nano"):
        assert all(r.activations != "int16" for r in conv.recipes(find_profile(pid), 200, 500)), pid
    assert any(r.activations == "int16" for r in conv.recipes(find_profile(str(_int16_profile(tmp_path))), 200, 500))


def test_speed_classes_and_graph_keys_of_the_real_recipes() -> None:
    from dataclasses import replace

    from converters.onnx import ONNXConverter
    from converters.tflite import TFLiteConverter

    tfl = {r.name: r for r in TFLiteConverter().recipes(find_profile("x86-64-avx512-server"), 1000, 500)}
    onx = ONNXConverter().recipes(find_profile("raspberry-pi-5"), 1000, 500)
    assert all(speed_class(r) == 0 for r in tfl.values())
    assert {speed_class(r) for r in onx if r.options.keep_sensitive} == {1}
    assert {speed_class(r) for r in onx if not r.options.keep_sensitive} == {0}
    # Calibration-only and weight-granularity variants build the same graph (ops and dtypes); another quantizer does not.
    assert graph_key(tfl["int8-per-channel"]) == graph_key(tfl["int8-per-channel-all-1000"]) == graph_key(tfl["int8-per-tensor"])
    assert graph_key(tfl["int8-per-channel"]) != graph_key(tfl["int8-legacy-calibrator"])
    base = next(r for r in onx if not r.options.keep_sensitive)
    for method in ("MinMax", "Percentile", "Entropy"):
        assert graph_key(replace(base, options=replace(base.options, method=method))) == graph_key(base)
    assert graph_key(replace(base, per_channel=not base.per_channel)) == graph_key(base)
    assert graph_key(replace(base, options=replace(base.options, keep_sensitive=1))) != graph_key(base)


def test_displacement_tolerance_and_early_stop_rule() -> None:
    from dataclasses import replace

    from converters.tflite import TFLiteConverter

    rs = {r.name: r for r in TFLiteConverter().recipes(find_profile("x86-64-avx512-server"), 1000, 500)}
    plain, other, same = rs["int8-per-channel"], rs["int8-legacy-calibrator"], rs["int8-per-tensor"]
    mixed = replace(plain, name="keep1", options=replace(plain.options, keep_sensitive=1))
    assert speed_class(mixed) == 1 and graph_key(other) != graph_key(plain) == graph_key(same)
    assert not displaces(1.0, 1.04) and displaces(0.9, 1.0)  # 4% faster is noise; 10% faster wins
    assert early_stop_reason(mixed, plain, 0.8, {}) is not None  # a slower class never runs once int8 meets the budget
    assert early_stop_reason(mixed, plain, 3.0, {}) is not None
    assert early_stop_reason(other, plain, 0.8, {}) is not None  # not slower than float: the same class cannot be >5% faster
    assert early_stop_reason(other, plain, 2.0, {graph_key(plain): (plain.name, 2.0)}) is None  # slower than float: another graph is tried
    assert early_stop_reason(same, plain, 2.0, {graph_key(plain): (plain.name, 2.0)}) is not None  # the same graph: the same speed
    # ... unless that graph ran fast enough to win and only missed the budget: the same graph may now meet it.
    assert early_stop_reason(same, plain, 2.0, {graph_key(plain): ("x", 1.0)}) is None


def test_fidelity_siblings_are_bias_corrected_variants_of_the_same_graph() -> None:
    from converters.evaluate import Evaluation, Fidelity
    from converters.onnx import ONNXConverter
    from converters.search import _more_faithful
    from converters.tflite import TFLiteConverter

    tfl = {r.name: r for r in TFLiteConverter().recipes(find_profile("x86-64-avx512-server"), 1000, 500)}
    plain = tfl["int8-per-channel"]
    assert fidelity_sibling(tfl["int8-bias-corrected"], plain) and fidelity_sibling(tfl["int8-cle-bias-corrected"], plain)
    assert not fidelity_sibling(tfl["int8-cle"], plain)  # same graph, no error correction
    assert not fidelity_sibling(tfl["int8-legacy-calibrator"], plain)  # another quantizer, another graph
    assert not fidelity_sibling(plain, plain)
    onx = {r.name: r for r in ONNXConverter().recipes(find_profile("x86-64-avx512-server"), 1000, 500)}
    bc = next(r for n, r in onx.items() if n.endswith("-bc") and "cle" not in n and "minmax" in n and not r.options.keep_sensitive)
    others = [r for r in onx.values() if fidelity_sibling(r, bc)]
    assert others and all(r.options.bias_correction and graph_key(r) == graph_key(bc) for r in others)
    assert not any(fidelity_sibling(r, bc) for r in onx.values() if r.options.keep_sensitive)  # float nodes: another graph

    def ev(*sqnr: float) -> Evaluation:
        return Evaluation(task="classification", accuracy=90.0, agreement=99.0,
                          fidelity={f"out{i}": Fidelity(sqnr_db=v, cosine=1.0, max_rel_error=0.0, max_abs_error=0.0) for i, v in enumerate(sqnr)})

    assert _more_faithful(ev(34.0), ev(30.4)) == (34.0, 30.4)
    assert _more_faithful(ev(30.4 + FIDELITY_MARGIN_DB / 2), ev(30.4)) is None  # within the margin: the first (faster-tried) stays
    assert _more_faithful(ev(40.0, 20.0), ev(30.0, 25.0)) is None  # the worst output decides
    assert _more_faithful(ev(34.0), None) is None


def test_host_runtime_names_what_ran_here() -> None:
    import onnxruntime as ort

    t = host_runtime("tflite", find_profile("coral-edgetpu"))
    assert t.threads == TIMING_THREADS == 1 and "XNNPACK" in t.unit and "Edge TPU" in t.note
    o = host_runtime("onnx", find_profile("pixel-8"))
    wanted = find_profile("pixel-8").formats.onnx.execution_providers
    assert o.unit == next(p for p in wanted if p in ort.get_available_providers())
    assert (o.note == "") == (o.unit == wanted[0])
    assert "1 thread" in o.label and o.unit in o.label


@pytest.fixture(scope="module")
def digits_source(digits, tmp_path_factory):
    from converters.source import load_source

    return load_source(digits["model"], tmp_path_factory.mktemp("speed-src"))


def test_int16x8_slowdown_reason_comes_from_the_measured_placement(digits, digits_source, tmp_path: Path) -> None:
    from converters.base import Recipe
    from converters.tflite import TFLiteConverter, TFLiteOptions

    conv = TFLiteConverter()
    prof = find_profile(str(_int16_profile(tmp_path)))
    recipe = Recipe("int16x8", "16x8", activations="int16", options=TFLiteOptions(io="int16", int16x8=True))
    with np.load(digits["calib"]) as d:
        calib = {digits_source.input_names[0]: d["x"][:50]}
    (tmp_path / "q").mkdir()
    (tmp_path / "f").mkdir()
    path = conv.convert(digits_source, prof, recipe, calib, tmp_path / "q")
    float_path = conv.convert_float(digits_source, tmp_path / "f")
    host = host_runtime("tflite", prof)
    model, fmodel = load_for_timing(path, host), load_for_timing(float_path, host)
    feeds = {model.inputs[0].name: calib[digits_source.input_names[0]][:1]}
    ffeeds = {fmodel.inputs[0].name: calib[digits_source.input_names[0]][:1]}
    speed = measure_speed(model, fmodel, feeds, ffeeds, 10, host)
    reason = slowdown_reason(path, float_path, model, feeds, speed)
    nodes = litert_xnnpack_placement(path)
    wide = sum(1 for n in nodes if n.dtype.startswith("int16"))
    off = sum(1 for n in nodes if n.placement != "xnnpack")
    assert wide > 1 and f"{wide} nodes take int16 activations" in reason and "reference kernels" in reason
    assert off > 1 and f"{off} of {len(nodes)} nodes are off the XNNPACK delegate" in reason
    assert "LiteRT" in reason and "1 thread" in reason and "per-call overhead" not in reason


def test_onnx_slowdown_reason_counts_the_qdq_nodes_the_runtime_ran(digits, tmp_path: Path) -> None:
    from converters.onnx import ONNXConverter
    from converters.source import load_source

    conv = ONNXConverter()
    prof = find_profile("x86-64-avx512-server")
    digits_source = load_source(digits["model"], tmp_path)
    recipe = conv.recipes(prof, 200, 500)[0]
    with np.load(digits["calib"]) as d:
        calib = {digits_source.input_names[0]: d["x"][:50]}
    (tmp_path / "q").mkdir()
    (tmp_path / "f").mkdir()
    path = conv.convert(digits_source, prof, recipe, calib, tmp_path / "q")
    float_path = conv.convert_float(digits_source, tmp_path / "f")
    host = host_runtime("onnx", prof)
    model, fmodel = load_for_timing(path, host), load_for_timing(float_path, host)
    x = calib[digits_source.input_names[0]][:1]
    speed = measure_speed(model, fmodel, {model.inputs[0].name: x}, {fmodel.inputs[0].name: x}, 10, host)
    reason = slowdown_reason(path, float_path, model, {model.inputs[0].name: x}, speed)
    qdq = [n for n in ort_node_providers(path, list(host.providers), tmp_path / "prof") if n.op in ("QuantizeLinear", "DequantizeLinear")]
    if qdq:
        word = "node is" if len(qdq) == 1 else "nodes are"
        assert f"{len(qdq)} QuantizeLinear/DequantizeLinear {word} left after ONNX Runtime's QDQ fusion" in reason
        assert host.unit in reason
    assert "ONNX Runtime" in reason and "1 thread" in reason
