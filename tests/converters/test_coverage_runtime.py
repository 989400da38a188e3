"""Coverage from the runtimes themselves, on tiny real models built here (LiteRT XNNPACK, ORT profiling, Coral)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "coverage_runtime"


def _keras(hard_swish: bool):  # noqa: ANN202 - a Keras model
    import keras

    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)
    x = keras.layers.Activation("hard_swish" if hard_swish else "relu")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(3)(x))


def _tflite(name: str, hard_swish: bool, mode: str) -> Path:
    path = CACHE / f"{name}.tflite"
    if path.exists():
        return path
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_keras_model(_keras(hard_swish))
    if mode != "float":
        rng = np.random.default_rng(0)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([rng.random((1, 8, 8, 3), dtype=np.float32)] for _ in range(8))
        conv.target_spec.supported_ops = ([tf.lite.OpsSet.TFLITE_BUILTINS_INT8] if mode == "int8" else
                                          [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8])
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(conv.convert())
    tmp.replace(path)
    return path


@pytest.fixture(scope="session")
def models() -> dict[str, Path]:
    return {"float_hs": _tflite("float_hs", True, "float"), "int8_hs": _tflite("int8_hs", True, "int8"),
            "int16x8": _tflite("int16x8", False, "int16x8")}


@pytest.fixture(scope="session")
def onnx_model() -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = CACHE / "conv_relu_gemm.onnx"
    if not path.exists():
        rng = np.random.default_rng(0)
        inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
                 numpy_helper.from_array(rng.standard_normal((4 * 8 * 8, 3)).astype(np.float32), "fc"),
                 numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape")]
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
                 helper.make_node("Reshape", ["r", "shape"], ["f"]), helper.make_node("MatMul", ["f", "fc"], ["y"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        CACHE.mkdir(parents=True, exist_ok=True)
        onnx.save(model, path)
    return path


def _row(cov, op: str, dtype: str):  # noqa: ANN001, ANN202
    return [p for p in cov.ops if p.op == op and p.dtype == dtype]


def test_xnnpack_placement_is_measured_and_names_the_op_and_dtype_it_left(models: dict[str, Path]) -> None:
    from converters.coverage import op_coverage
    from edgekit.profiles import find_profile

    prof = find_profile("x86-64-avx512-server")
    cov = op_coverage((), prof, "tflite", model_path=models["int8_hs"])
    assert cov.basis.startswith("measured on host (") and "XNNPACK" in cov.basis
    hs = _row(cov, "HARD_SWISH", "int8")
    assert hs and all(p.placement == "cpu" and "did not take HARD_SWISH with int8" in p.reason for p in hs)
    assert _row(cov, "CONV_2D", "int8")[0].placement == "xnnpack"
    assert cov.ops_on_target == cov.total_ops - 1 and "HARD_SWISH" in cov.fallbacks


def test_measured_placement_overrides_the_static_list(models: dict[str, Path]) -> None:
    """Float HARD_SWISH is not on the profile's list, but this host's XNNPACK takes it: the runtime wins."""
    from converters.coverage import op_coverage
    from edgekit.profiles import find_profile

    prof = find_profile("x86-64-avx512-server")
    assert "HARD_SWISH" not in prof.accelerators_for("tflite")[0].supported_ops
    cov = op_coverage((), prof, "tflite", model_path=models["float_hs"])
    assert cov.share_on_target == 1.0 and _row(cov, "HARD_SWISH", "float32")[0].placement == "xnnpack"
    static = op_coverage(("CONV_2D", "HARD_SWISH"), prof, "tflite")
    assert static.basis.startswith("estimated") and "HARD_SWISH" in static.fallbacks


def test_int16x8_nodes_are_labelled_int16x8_and_xnnpack_takes_none(models: dict[str, Path]) -> None:
    """LiteRT 2.3's XNNPACK has no 16x8 kernels (checked here); the profile says so too."""
    from converters.coverage import op_coverage
    from edgekit.profiles import find_profile

    prof = find_profile("x86-64-avx512-server")
    cov = op_coverage((), prof, "tflite", model_path=models["int16x8"])
    conv = _row(cov, "CONV_2D", "int16x8")
    assert conv and conv[0].placement == "cpu"
    assert not any(p.dtype == "int8" and p.op == "CONV_2D" for p in cov.ops)
    assert all(p.placement == "cpu" for p in cov.ops if p.dtype == "int16x8")
    assert cov.ops_on_target == 0  # measured: not even the float->int16 QUANTIZE goes to XNNPACK
    assert not prof.accelerators_for("tflite")[0].int16x8_kernels


def test_onnx_runtime_profile_names_the_provider_of_every_node(onnx_model: Path) -> None:
    from converters.coverage import op_coverage
    from edgekit.profiles import find_profile

    cov = op_coverage((), find_profile("x86-64-avx512-server"), "onnx", model_path=onnx_model)
    assert cov.basis.startswith("measured on host (ONNX Runtime") and "CPUExecutionProvider" in cov.basis
    assert cov.total_ops >= 2 and cov.share_on_target == 1.0
    assert {p.dtype for p in cov.ops} == {"float32"} and {p.placement for p in cov.ops} == {"cpu_ep"}


def test_onnx_ep_not_available_here_stays_estimated(onnx_model: Path) -> None:
    from converters.coverage import op_coverage
    from edgekit.profiles import find_profile

    prof = find_profile("iphone-15-pro")
    if prof.formats.onnx is None or prof.formats.onnx.execution_providers[0] == "CPUExecutionProvider":
        pytest.skip("the iPhone profile names no non-CPU EP")
    cov = op_coverage(("Conv", "Relu"), prof, "onnx", model_path=onnx_model)
    assert cov.basis.startswith("estimated") and "not available" in cov.note
    assert {p.dtype for p in cov.ops} == {"float32"} and cov.total_ops == 4


def test_estimated_onnx_placement_applies_the_eps_dtype_rules(tmp_path: Path) -> None:
    """An int8 DequantizeLinear is off an EP whose dtypes are float only (the iPhone profile's Core ML EP)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from converters.coverage import op_coverage
    from edgekit.profiles import find_profile

    prof = find_profile("iphone-15-pro")
    target = prof.accelerators_for("onnx")[0]
    if "int8" in target.dtypes or prof.formats.onnx.execution_providers[0] == "CPUExecutionProvider":
        pytest.skip("the iPhone profile's ONNX target takes int8")
    q = numpy_helper.from_array(np.array([1, -2, 3], dtype=np.int8), "q")
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s")
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["d"]), helper.make_node("Add", ["d", "x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [q, scale])
    path = tmp_path / "dq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    cov = op_coverage((), prof, "onnx", model_path=path)
    dq = _row(cov, "DequantizeLinear", "int8")[0]
    assert dq.placement != target.id
    assert _row(cov, "Add", "float32")[0].placement == target.id


def test_coral_without_the_compiler_says_not_compiled_and_applies_dtype_rules(models: dict[str, Path], tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from converters.coverage import op_coverage
    from converters.edgetpu_compiler import NOT_COMPILED_NOTE, compiler_path
    from edgekit.profiles import find_profile

    monkeypatch.setenv("PATH", str(tmp_path))
    assert compiler_path() is None
    prof = find_profile("coral-edgetpu")
    cov = op_coverage((), prof, "tflite", model_path=models["float_hs"])
    assert cov.note == NOT_COMPILED_NOTE and cov.basis.startswith("estimated")
    conv = _row(cov, "CONV_2D", "float32")[0]
    assert conv.placement == "xnnpack" and "no float32 kernels" in conv.reason and "runs on xnnpack" in conv.reason
    int8 = op_coverage((), prof, "tflite", model_path=models["int8_hs"])
    assert _row(int8, "CONV_2D", "int8")[0].placement == "edgetpu" and int8.note == NOT_COMPILED_NOTE


# The "-s" table of edgetpu_compiler, in the format shown at https://coral.ai/docs/edgetpu/compiler/
COMPILER_LOG = """Edge TPU Compiler version 16.0.384591198
Started a compilation timeout timer of 180 seconds.

Model compiled successfully in 420 ms.

Input model: model_int8.tflite
Input size: 3.96MiB
Output model: model_int8_edgetpu.tflite
Output size: 4.26MiB
On-chip memory used for caching model parameters: 3.92MiB
Number of Edge TPU subgraphs: 1
Total number of operations: 32
Operation log: model_int8_edgetpu.log

Model successfully compiled but not all operations are supported by the Edge TPU. A percentage of the model will instead run on the CPU, which is slower. If possible, consider updating your model to use only operations supported by the Edge TPU. For details, visit g.co/coral/model-reqs.
Number of operations that will run on Edge TPU: 30
Number of operations that will run on CPU: 2

Operator                       Count      Status

CONV_2D                        14         Mapped to Edge TPU
DEPTHWISE_CONV_2D              13         Mapped to Edge TPU
QUANTIZE                       1          Mapped to Edge TPU
MEAN                           1          Mapped to Edge TPU
FULLY_CONNECTED                1          Mapped to Edge TPU
HARD_SWISH                     1          Operation not supported
DEQUANTIZE                     1          Operation is working on an unsupported data type
"""


def test_compiler_log_parser_reads_the_operation_table() -> None:
    from converters.edgetpu_compiler import parse_compiler_log

    rows = parse_compiler_log(COMPILER_LOG)
    assert [(r.op, r.count) for r in rows][:2] == [("CONV_2D", 14), ("DEPTHWISE_CONV_2D", 13)]
    assert sum(r.count for r in rows if r.mapped) == 30 and sum(r.count for r in rows if not r.mapped) == 2
    assert next(r for r in rows if r.op == "HARD_SWISH").status == "Operation not supported"
    assert parse_compiler_log("no table here\nCONV_2D 3 Mapped to Edge TPU") == []


def test_litert_reads_node_dtypes_without_delegates(models: dict[str, Path]) -> None:
    from converters.coverage_runtime import litert_nodes

    nodes = litert_nodes(models["int8_hs"])
    assert nodes[0].op == "QUANTIZE" and nodes[0].dtype == "float32" and {n.placement for n in nodes} == {"cpu"}
    assert os.path.getsize(models["int8_hs"]) > 0


def test_int16x8_is_never_labelled_int8() -> None:
    from converters.precision import precision_label

    assert precision_label("int8", "int8") == "INT8"
    label = precision_label("int8", "int16")
    assert label.startswith("INT16x8") and "not INT8" in label
    assert "mixed" in precision_label("int8", "int8", kept_in_float=2)


def test_bundles_carry_the_coverage_basis_precision_and_the_coral_note(digits_bundles, monkeypatch: pytest.MonkeyPatch) -> None:
    """The signed manifests: XNNPACK profiles measured here, Coral not compiled (no edgetpu_compiler here)."""
    from converters.edgetpu_compiler import NOT_COMPILED_NOTE, compiler_path
    from edgekit.bundle import open_bundle

    for r in digits_bundles.results:
        m = open_bundle(r.bundle_dir).manifest
        # The search keeps the fastest recipe within budget on this host, which may be XNNPACK's mixed one (float islands,
        # labelled as such); full-integer accelerators (Coral) never get it.
        mixed = m.quantization.precision.startswith("INT8, ") and m.quantization.precision.endswith("(mixed)")
        assert m.quantization.precision == "INT8" or (mixed and r.profile != "coral-edgetpu"), m.quantization.precision
        assert m.coverage is not None and all(p.dtype for p in m.coverage.ops)
        if r.profile == "raspberry-pi-5":
            assert m.coverage.basis.startswith("measured on host (")
        if r.profile == "coral-edgetpu" and compiler_path() is None:
            assert m.coverage.note == NOT_COMPILED_NOTE and m.coverage.basis.startswith("estimated")



def test_report_shows_the_basis_dtype_and_note(digits_bundles, tmp_path: Path) -> None:
    from converters.edgetpu_compiler import NOT_COMPILED_NOTE, compiler_path
    from converters.report import write_reports

    write_reports(digits_bundles, tmp_path)
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "Op placement, measured on host (" in text and "SOFTMAX [int8] x1: cpu (LiteRT's XNNPACK delegate did not take" in text
    if compiler_path() is None:
        assert f"Note: {NOT_COMPILED_NOTE}" in text


def test_edgetpu_attribute_rule_refuses_a_2d_softmax_and_closes_the_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """coral.ai: the Edge TPU's SOFTMAX takes only a 1-D input; after it nothing else maps (prefix)."""
    import keras
    import tensorflow as tf

    from converters.coverage import op_coverage
    from edgekit.profiles import find_profile

    path = CACHE / "softmax2d_int8.tflite"
    if not path.exists():
        inp = keras.Input((16,), batch_size=1)  # static shapes: no SHAPE op (not on the Edge TPU) before the softmax
        x = keras.layers.Reshape((4, 4))(keras.layers.Dense(16)(inp))
        x = keras.layers.Softmax(axis=-1)(x)
        model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        rng = np.random.default_rng(0)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([rng.random((1, 16), dtype=np.float32)] for _ in range(8))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        CACHE.mkdir(parents=True, exist_ok=True)
        path.write_bytes(conv.convert())
    monkeypatch.setenv("PATH", str(tmp_path))
    cov = op_coverage((), find_profile("coral-edgetpu"), "tflite", model_path=path)
    sm = _row(cov, "SOFTMAX", "int8")[0]
    assert sm.placement != "edgetpu" and "only a 1-D input" in sm.reason and "coral.ai" in sm.reason
    fcs = _row(cov, "FULLY_CONNECTED", "int8")
    assert any(p.placement == "edgetpu" for p in fcs) and any("stays off" in p.reason for p in fcs)


def test_a_model_the_runtime_cannot_run_falls_back_to_an_estimate_that_says_why(tmp_path: Path) -> None:
    from converters.coverage import op_coverage
    from edgekit.profiles import find_profile

    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"not a flatbuffer")
    cov = op_coverage(("CONV_2D",), find_profile("x86-64-avx512-server"), "tflite", model_path=broken)
    assert cov.basis.startswith("estimated") and "could not report the placement" in cov.note
