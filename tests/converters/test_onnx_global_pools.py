"""Spatial ReduceMean (global average pooling as tf2onnx and torch.onnx write it) is quantized as GlobalAveragePool:
the same values, and ONNX Runtime then fuses it into an int8 kernel instead of running it in float between Q/DQ pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converters.onnx_transforms import global_average_pools


def _reduce_mean_model(axes: list[int], keepdims: int, opset: int = 17, shape=(2, 8, 5, 7)):
    import onnx
    from onnx import TensorProto, helper

    rank = len(shape)
    out_shape = [d if i not in [a % rank for a in axes] else 1 for i, d in enumerate(shape)] if keepdims else \
        [d for i, d in enumerate(shape) if i not in [a % rank for a in axes]]
    inits = []
    if opset >= 18:
        inits.append(helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes))
        node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean", keepdims=keepdims)
    else:
        node = helper.make_node("ReduceMean", ["x"], ["y"], name="mean", axes=axes, keepdims=keepdims)
    relu = helper.make_node("Relu", ["y"], ["z"], name="relu")  # a consumer, so the rewrite's outputs are wired, not only named
    g = helper.make_graph([node, relu], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, out_shape)], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _run(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize(("axes", "keepdims", "opset", "shape"), [
    ([2, 3], 1, 17, (2, 8, 5, 7)),  # squeeze-excite (Keras GlobalAveragePooling2D(keepdims=True))
    ([2, 3], 0, 17, (2, 8, 5, 7)),  # the head's pooling before the classifier
    ([-1, -2], 1, 18, (2, 8, 5, 7)),  # opset 18: axes as a constant input, negative
    ([2], 0, 17, (3, 6, 11)),  # 1-D
])
def test_spatial_reduce_mean_becomes_global_average_pool_with_the_same_values(axes, keepdims, opset, shape) -> None:
    import onnx

    model = _reduce_mean_model(axes, keepdims, opset, shape)
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    before = _run(model, x)
    assert global_average_pools(model) == 1
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert "ReduceMean" not in ops and ops[0] == "GlobalAveragePool" and ops[-1] == "Relu"
    after = _run(model, x)
    assert after.shape == before.shape
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("axes", "shape"), [([1, 2], (2, 5, 7, 8)), ([3], (2, 8, 5, 7)), ([0, 2, 3], (2, 8, 5, 7)), ([1], (4, 9))])
def test_other_reductions_are_left_alone(axes, shape) -> None:
    model = _reduce_mean_model(axes, 1, 17, shape)
    before = model.SerializeToString()
    assert global_average_pools(model) == 0
    assert model.SerializeToString() == before


@pytest.fixture(scope="module")
def se_cnn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small CNN with a squeeze-excite block (GlobalAveragePooling2D keepdims=True) and a pooled head, trained on digits."""
    import keras
    from sklearn.datasets import load_digits

    keras.utils.set_random_seed(3)
    L = keras.layers
    inp = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="stem")(inp)
    s = L.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
    s = L.Conv2D(4, 1, activation="relu", name="se_reduce")(s)
    s = L.Conv2D(16, 1, activation="sigmoid", name="se_expand")(s)
    x = L.Multiply(name="se_scale")([x, s])
    x = L.Conv2D(24, 3, activation="relu", name="conv")(x)
    x = L.GlobalAveragePooling2D(name="head_pool")(x)
    model = keras.Model(inp, L.Dense(10, activation="softmax", name="classifier")(x))
    d = load_digits()
    xs = (d.images / 16.0).astype(np.float32)[..., None]
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(xs[:1200], d.target[:1200], epochs=8, batch_size=32, verbose=0)
    out = tmp_path_factory.mktemp("se")
    model.save(out / "se.keras")
    np.savez(out / "calib.npz", x=xs[:200])
    np.savez(out / "eval.npz", x=xs[1200:], y=d.target[1200:])
    return {"model": out / "se.keras", "onnx": _as_reduce_means(out / "se.keras", out), "calib": out / "calib.npz", "eval": out / "eval.npz"}


def _as_reduce_means(keras_path: Path, out: Path) -> Path:
    """The model's ONNX with each global pool written as ReduceMean(axes=[2, 3], keepdims=1), as torch.onnx writes x.mean((2, 3),
    keepdim=True) and tf2onnx writes MobileNetV3's squeeze-excite blocks (here tf2onnx wrote GlobalAveragePool for this small model)."""
    import onnx
    from onnx import helper

    from converters.onnx import export_float_onnx
    from converters.source import load_source

    work = out / "export"
    work.mkdir()
    m = onnx.load(str(export_float_onnx(load_source(keras_path, work), 17, work)))
    pools = [i for i, n in enumerate(m.graph.node) if n.op_type == "GlobalAveragePool"]
    assert len(pools) == 2
    for i in pools:
        n = m.graph.node[i]
        m.graph.node[i].CopyFrom(helper.make_node("ReduceMean", list(n.input), list(n.output), name=n.name, axes=[2, 3], keepdims=1))
    onnx.checker.check_model(m)
    path = out / "se-reduce-mean.onnx"
    onnx.save(m, str(path))
    return path


def test_converted_int8_model_runs_its_global_pools_in_int8(se_cnn, tmp_path: Path, run_cli) -> None:
    import onnx
    import onnxruntime as ort

    out = tmp_path / "out"
    code, stdout, err = run_cli("convert", se_cnn["onnx"], "--profile", "x86-64-avx512-server", "--format", "onnx", "--calibration",
                                se_cnn["calib"], "--eval", se_cnn["eval"], "--out", out, "--latency-runs", "5", "--json")
    assert code == 0, err
    (r,) = json.loads(stdout)["results"]
    assert any("2 ReduceMean over the spatial axes quantized as GlobalAveragePool" in v for v in r["verification"])
    path = Path(r["bundle"]) / r["file"]
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "ReduceMean" not in ops and ops.count("GlobalAveragePool") == 2
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert fused.count("QLinearGlobalAveragePool") == 2 and "GlobalAveragePool" not in fused  # both pools run on the int8 kernel
    assert r["metrics"]["agreement"]["value"] >= 95
    # The report names only the op types the runtime really leaves in float (the float head's Softmax), not the fused pools or Sigmoid.
    (left,) = [v for v in r["verification"] if v.startswith("quantization: op types the ORT quantizer has no int8 rule")]
    assert "measured here" in left and "Softmax" in left and "GlobalAveragePool" not in left and "Sigmoid" not in left
