"""The peers benchmark's models and data (bench/quantization_peers.py): its depthwise-separable CNN trained here, the MNIST
example, the MobileNets with random weights, and the float files every side starts from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.harness import ROOT, quiet

__all__ = ["DSB_RECIPE", "MOBILENET_CALIB", "OPSET", "build_dsb_cnn", "edgekit_floats", "ensure_dsb", "float_models", "prepare_model"]

OPSET = 17
DSB_RECIPE = {"version": 2, "epochs": 15, "batch_size": 64, "seed": 11, "train": 3500, "select": 500, "test": 1000, "calib": 500}
MOBILENET_CALIB = 32


def _save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def build_dsb_cnn():
    """The depthwise-separable CNN this benchmark trains (not the held-out model of the tests)."""
    import keras

    L = keras.layers

    def block(x, dw_stride: int, pw: int):
        x = L.DepthwiseConv2D(3, strides=dw_stride, padding="same", use_bias=False)(x)
        x = L.ReLU()(L.BatchNormalization()(x))
        x = L.Conv2D(pw, 1, use_bias=False)(x)
        return L.ReLU()(L.BatchNormalization()(x))

    inp = keras.Input((28, 28, 1))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inp)))
    x = block(x, 1, 24)
    x = block(x, 2, 32)
    x = block(x, 1, 48)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10, activation="softmax")(x), name="dsb_cnn")


def ensure_dsb(out: Path) -> dict[str, Path]:
    """Train once (cached); model, calibration, selection and test files."""
    files = {"model": out / "dsb_cnn.keras", "calib": out / "calib.npz", "select": out / "select.npz", "test": out / "test.npz"}
    meta = out / "meta.json"
    if all(p.exists() for p in files.values()) and meta.exists() and json.loads(meta.read_text()).get("recipe") == DSB_RECIPE:
        return files
    import keras

    from examples.mnist.train import load_mnist

    r = DSB_RECIPE
    x, y = load_mnist()
    idx = np.random.default_rng(r["seed"]).permutation(len(x))
    te, se, tr = idx[: r["test"]], idx[r["test"] : r["test"] + r["select"]], idx[r["test"] + r["select"] :]
    keras.utils.set_random_seed(r["seed"])
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()  # the same weights on every run of the benchmark (version 1 gave 88.4% and 90.2%)
    model = build_dsb_cnn()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[tr], y[tr], epochs=r["epochs"], batch_size=r["batch_size"], verbose=0)
    out.mkdir(parents=True, exist_ok=True)
    model.save(files["model"])
    _save_npz(files["calib"], x=x[tr[: r["calib"]]])
    _save_npz(files["select"], x=x[se], y=y[se])
    _save_npz(files["test"], x=x[te], y=y[te])
    acc = float((model.predict(x[te], verbose=0).argmax(-1) == y[te]).mean() * 100)
    meta.write_text(json.dumps({"recipe": r, "float_top1_test": acc, "params": model.count_params()}, indent=2))
    return files


def prepare_model(label: str, work: Path) -> dict:
    """Files for one model: .keras, calib/select/test .npz (select/test None for the MobileNets)."""
    d = work / label
    d.mkdir(parents=True, exist_ok=True)
    if label == "dsb_cnn":
        with quiet():
            files = dict(ensure_dsb(ROOT / ".cache" / "bench" / "peers_dsb_cnn"))
        return {**files, "accuracy": True}
    if label == "mnist_cnn":
        from examples.mnist.train import ensure_example

        ex = ensure_example(ROOT / ".cache" / "examples" / "mnist")
        ev = np.load(ex["eval"])
        return {"model": ex["model"], "calib": ex["calib"], "accuracy": True,
                "select": _save_npz(d / "select.npz", x=ev["x"][:400], y=ev["y"][:400]),
                "test": _save_npz(d / "test.npz", x=ev["x"][400:], y=ev["y"][400:])}
    import keras

    keras.utils.set_random_seed(0)
    if label == "mobilenet_v2":
        model, lo, hi = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3)), -1.0, 1.0
    else:  # MobileNetV3Small rescales 0-255 inputs itself (include_preprocessing=True)
        model, lo, hi = keras.applications.MobileNetV3Small(weights=None, input_shape=(224, 224, 3)), 0.0, 255.0
    path = d / f"{label}.keras"
    model.save(path)
    x = np.random.default_rng(0).uniform(lo, hi, (MOBILENET_CALIB, 224, 224, 3)).astype(np.float32)
    return {"model": path, "calib": _save_npz(d / "calib.npz", x=x), "select": None, "test": None, "accuracy": False}


def float_models(files: dict, d: Path) -> dict[str, Path]:
    """The float files the peers start from: TFLiteConverter .tflite and tf2onnx .onnx (input named 'input')."""
    import keras
    import tensorflow as tf
    import tf2onnx

    with quiet():
        model = keras.models.load_model(files["model"])
        tfl = d / "float.tflite"
        tfl.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
        onx = d / "float.onnx"
        spec = [tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32, name="input")]
        tf2onnx.convert.from_function(tf.function(lambda x: model(x, training=False)), input_signature=spec, opset=OPSET,
                                      output_path=str(onx))
    return {"tflite": tfl, "onnx": onx}


def edgekit_floats(model_path: Path, d: Path) -> dict[str, Path]:
    """The float files edgekit itself compares against (its TFLite float conversion, its ONNX export)."""
    from converters.onnx import export_float_onnx
    from converters.source import load_source
    from converters.tflite import TFLiteConverter

    work = d / "ek-float-work"
    work.mkdir(exist_ok=True)
    out = d / "ek-float"
    out.mkdir(exist_ok=True)
    with quiet():
        src = load_source(model_path, work)
        tfl = TFLiteConverter().convert_float(src, out)
        onx = export_float_onnx(src, OPSET, out)
    return {"tflite": tfl, "onnx": Path(onx)}


# ---------------------------------------------------------------- running the sides
