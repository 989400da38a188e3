"""Op placement against a profile's accelerators (pure; no models)."""

from __future__ import annotations

from edgekit.profiles import HardwareProfile


def _profile(partitioning: str = "prefix") -> HardwareProfile:
    return HardwareProfile.model_validate({
        "id": "t", "name": "t", "os": "linux",
        "cpu": {"arch": "arm64", "model": "A53", "cores": 4},
        "memory": {"ram_mb": 1024, "model_budget_mb": 100},
        "accelerators": [
            {"id": "tpu", "kind": "tpu", "name": "TPU", "runtime": "tflite", "dtypes": ["int8"], "partitioning": partitioning,
             "supported_ops": ["CONV_2D", "FULLY_CONNECTED", "SOFTMAX"], "source": "https://example.org/tpu"},
            {"id": "xnnpack", "kind": "cpu", "name": "XNNPACK", "runtime": "tflite", "dtypes": ["int8"],
             "supported_ops": ["CONV_2D", "FULLY_CONNECTED", "SOFTMAX", "RESHAPE"], "source": "https://example.org/x"},
        ],
        "formats": {"tflite": {"delegates": ["tpu", "xnnpack"]}},
    })


def test_everything_supported_stays_on_target() -> None:
    from converters.coverage import op_coverage

    c = op_coverage(["CONV_2D", "CONV_2D", "FULLY_CONNECTED", "SOFTMAX"], _profile(), "tflite")
    assert c.target == "tpu" and c.ops_on_target == 4 and c.share_on_target == 1.0 and c.fallbacks == ()


def test_prefix_partitioning_stops_at_the_first_unsupported_op() -> None:
    from converters.coverage import op_coverage

    c = op_coverage(["CONV_2D", "RESHAPE", "FULLY_CONNECTED", "SOFTMAX", "GATHER"], _profile("prefix"), "tflite")
    assert c.ops_on_target == 1 and c.share_on_target == 0.2
    where = {(p.op, p.placement) for p in c.ops}
    assert ("RESHAPE", "xnnpack") in where and ("FULLY_CONNECTED", "xnnpack") in where and ("GATHER", "cpu") in where
    fc = next(p for p in c.ops if p.op == "FULLY_CONNECTED")
    assert "stays off" in fc.reason


def test_any_partitioning_returns_to_the_accelerator() -> None:
    from converters.coverage import op_coverage

    c = op_coverage(["CONV_2D", "RESHAPE", "FULLY_CONNECTED"], _profile("any"), "tflite")
    assert c.ops_on_target == 2 and c.fallbacks == ("RESHAPE",)


def test_cpu_only_profile() -> None:
    from converters.coverage import op_coverage

    p = _profile().model_copy(update={"formats": _profile().formats.model_copy(update={"tflite": _profile().formats.tflite.model_copy(update={"delegates": ()})})})
    c = op_coverage(["CONV_2D", "GATHER"], p, "tflite")
    assert c.target == "cpu" and c.share_on_target == 1.0
