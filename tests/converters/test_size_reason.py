"""The size warning of an INT8 file larger than its float model gives the measured byte split, never a guess."""

from __future__ import annotations

import numpy as np

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
    assert "of its 30,000 bytes, 6,000 are int8 weights, 4,000 float constants" in why and "20,000 the rest (int32 biases" in why


def test_formats_without_byte_counts_say_so() -> None:
    assert _size_reason({"size_bytes": _m(30_000), "float_size_bytes": _m(25_000)}) == "the weight bytes of this format are not counted here"


def test_tflite_bundles_count_their_int8_weights(digits, digits_bundles) -> None:
    """The byte counts the wording reads, from a real LiteRT file: every conv and dense kernel element is one int8 byte."""
    import keras

    model = keras.models.load_model(digits["model"], compile=False)
    kernels = sum(int(np.prod(w.shape)) for w in model.weights if len(w.shape) >= 2)  # 3x3x1x8 + 288x32 + 32x10
    assert digits_bundles.results
    for r in digits_bundles.results:
        m = r.manifest.metrics
        assert m["int8_weight_bytes"].status == m["float_weight_bytes"].status == "measured"
        if "mixed" in r.manifest.quantization.precision:  # the 1-channel stem conv kept in float32 (int8-xnnpack-mixed)
            stem = 3 * 3 * 1 * 8
            assert m["int8_weight_bytes"].value == kernels - stem and m["float_weight_bytes"].value == 4 * (stem + 8)  # kernel + bias
        else:
            assert m["int8_weight_bytes"].value == kernels
            assert m["float_weight_bytes"].value == 0  # full int8: biases are int32, no layer kept in float
