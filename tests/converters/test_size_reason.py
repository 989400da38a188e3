"""The size warning of an INT8 file larger than its float model gives the measured byte split, never a guess."""

from __future__ import annotations

from converters.package import _size_reason
from edgekit.manifest import Metric


def _m(v: float | None) -> Metric:
    return Metric(value=v, unit="B", status="measured")


def test_weights_built_at_run_time_are_named() -> None:
    metrics = {"size_bytes": _m(5_200_000), "float_size_bytes": _m(9_000), "int8_weight_bytes": _m(1_200_000), "float_weight_bytes": _m(40_000)}
    why = _size_reason(metrics)
    assert "1,200,000" in why and "9,000" in why and "computes its weights at run time" in why


def test_byte_split_adds_up_to_the_file() -> None:
    metrics = {"size_bytes": _m(30_000), "float_size_bytes": _m(25_000), "int8_weight_bytes": _m(6_000), "float_weight_bytes": _m(4_000)}
    why = _size_reason(metrics)
    assert "of its 30,000 bytes, 6,000 are int8 weights, 4,000 float initializers" in why and "20,000 graph structure" in why


def test_formats_without_byte_counts_say_so() -> None:
    assert _size_reason({"size_bytes": _m(30_000), "float_size_bytes": _m(25_000)}) == "the weight bytes of this format are not counted here"
