"""The Keras -> ONNX export's memory fixes (converters/onnx_export.py): same ONNX as stock tf2onnx, no copy per pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="module")
def small_saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A static batch-1 SavedModel of a small CNN (conv, batch norm, depthwise, dense softmax)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(3)
    x = keras.Input((16, 16, 3), name="image")
    h = keras.layers.Conv2D(8, 3, padding="same")(x)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(x, keras.layers.Dense(5, activation="softmax")(h))
    d = tmp_path_factory.mktemp("export-memory") / "sm"
    model.export(str(d), format="tf_saved_model", input_signature=[tf.TensorSpec((1, 16, 16, 3), tf.float32, name="image")], verbose=False)
    return d


def _export(module: str, sm: Path, out: Path) -> bytes:
    proc = subprocess.run([sys.executable, "-m", module, "--saved-model", str(sm), "--output", str(out), "--opset", "17",
                           "--signature_def", "serving_default"], check=False, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out.read_bytes()


def test_memory_fixed_export_writes_the_same_onnx_as_stock_tf2onnx(small_saved_model: Path, tmp_path: Path) -> None:
    stock = _export("tf2onnx.convert", small_saved_model, tmp_path / "stock.onnx")
    fixed = _export("converters.onnx_export", small_saved_model, tmp_path / "fixed.onnx")
    assert len(stock) > 1000
    assert fixed == stock


_GROWTH = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
from tf2onnx import graph

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

if sys.argv[1] == "fixed":
    from converters.onnx_export import _patch_tf2onnx_memory
    _patch_tf2onnx_memory()
g = graph.Graph([], opset=17)
node = g.make_const("w", np.ones(8_000_000, np.float32))  # 32 MB
node.update_proto()
before = rss()
for _ in range(10):  # what ten optimizer passes do to every node
    node.update_proto()
print(rss() - before)
"""


def _growth(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", _GROWTH, mode], check=False, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


def test_rewriting_a_node_after_each_pass_keeps_no_copy_of_its_tensor() -> None:
    copy_bytes = 32e6
    stock = _growth("stock")
    if stock < 3 * copy_bytes:
        pytest.skip(f"this protobuf backend frees replaced attributes itself (stock tf2onnx grew {stock / 1e6:.0f} MB over 10 passes)")
    fixed = _growth("fixed")
    assert fixed < copy_bytes, f"grew {fixed / 1e6:.0f} MB over 10 passes of a 32 MB constant (stock tf2onnx: {stock / 1e6:.0f} MB)"


def test_a_small_model_exports_in_process_to_the_same_graph_as_the_child_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small models run tf2onnx's command line in the conversion process (no second TensorFlow import): same graph, same outputs."""
    import keras
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from converters import onnx_export
    from converters.source import load_source

    keras.utils.set_random_seed(5)
    x = keras.Input((12, 12, 1), name="image")
    h = keras.layers.BatchNormalization()(keras.layers.Conv2D(6, 3, padding="same")(x))
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(h))
    keras.Model(x, keras.layers.Dense(4, activation="softmax")(h)).save(tmp_path / "m.keras")
    source = load_source(tmp_path / "m.keras", tmp_path)
    assert source.param_count <= onnx_export.IN_PROCESS_MAX_PARAMS
    paths = {}
    for mode, limit in (("child", -1), ("here", onnx_export.IN_PROCESS_MAX_PARAMS)):
        monkeypatch.setattr(onnx_export, "IN_PROCESS_MAX_PARAMS", limit)
        (tmp_path / mode).mkdir()
        paths[mode] = onnx_export.export_float_onnx(source, 17, tmp_path / mode)
    child, here = (onnx.load(str(paths[m])) for m in ("child", "here"))
    assert [n.op_type for n in here.graph.node] == [n.op_type for n in child.graph.node]
    assert [(v.name, str(v.type)) for v in [*here.graph.input, *here.graph.output]] == \
        [(v.name, str(v.type)) for v in [*child.graph.input, *child.graph.output]]
    weights = [sorted(numpy_helper.to_array(i).tobytes() for i in m.graph.initializer) for m in (here, child)]
    assert weights[0] == weights[1]  # tf2onnx may list the initializers in another order, under other short names
    data = np.random.default_rng(0).normal(size=(1, 12, 12, 1)).astype(np.float32)
    out = [ort.InferenceSession(str(paths[m])).run(None, {"image": data})[0] for m in ("child", "here")]
    np.testing.assert_array_equal(out[0], out[1])
