"""Train the example's cloud model: a larger float CNN for the hybrid router to escalate to (cached).

Same data as the device model (examples/mnist/train.py): it trains on the same seeded train
split (4,000 images), so the 1,000 held-out ``eval`` images are unseen by *both* models. The
router needs data neither model saw, for calibration and for testing, so this module also
splits those 1,000 images once, seeded, into ``router_calib.npz`` (first 800: temperature fit
and threshold choice) and ``router_test.npz`` (last 200: the test split). See docs/router.md.

    python -m examples.mnist.cloud [--out .cache/examples/mnist] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from hybrid_router.cloud_model import export_keras_onnx
from examples.mnist.train import DEFAULT_OUT, ensure_example, load_mnist, split

__all__ = ["CLOUD_RECIPE", "build_cloud_model", "ensure_cloud_model"]

CLOUD_RECIPE = {"version": 1, "epochs": 14, "batch_size": 64, "seed": 1, "shift": 0.1, "router_calib": 800, "opset": 17}


def build_cloud_model():
    """A wider, deeper float CNN with dropout and shift augmentation (~0.4 M parameters)."""
    import keras

    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.RandomTranslation(CLOUD_RECIPE["shift"], CLOUD_RECIPE["shift"], fill_mode="constant"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(10, activation="softmax"),
    ], name="mnist_cloud_cnn")


def _fingerprint() -> str:
    src = Path(__file__).read_bytes() + Path(__file__).with_name("train.py").read_bytes()
    return hashlib.sha256(json.dumps(CLOUD_RECIPE, sort_keys=True).encode() + src).hexdigest()[:16]


def ensure_cloud_model(out: Path = DEFAULT_OUT, force: bool = False) -> dict[str, Path]:
    """Train the cloud model once and cache it (``.keras`` and ``.onnx``) with the router's data splits."""
    files = {"model": out / "mnist_cloud.keras", "onnx": out / "mnist_cloud.onnx", "router_calib": out / "router_calib.npz",
             "router_test": out / "router_test.npz", "meta": out / "cloud_meta.json"}
    fp = _fingerprint()
    if not force and all(p.exists() for p in files.values()) and json.loads(files["meta"].read_text()).get("fingerprint") == fp:
        return files
    ensure_example(out)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.utils.set_random_seed(CLOUD_RECIPE["seed"])
    parts = split(*load_mnist())
    model = build_cloud_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    xt, yt = parts["train"]
    model.fit(xt, yt, epochs=CLOUD_RECIPE["epochs"], batch_size=CLOUD_RECIPE["batch_size"], verbose=0)
    xe, ye = parts["eval"]
    acc = float((model.predict(xe, verbose=0).argmax(-1) == ye).mean())
    tmp = out / ".tmp-cloud"
    tmp.mkdir(parents=True, exist_ok=True)
    model.save(tmp / files["model"].name)
    export_keras_onnx(model, tmp / files["onnx"].name, CLOUD_RECIPE["opset"])
    n = CLOUD_RECIPE["router_calib"]
    np.savez(tmp / files["router_calib"].name, x=xe[:n], y=ye[:n])
    np.savez(tmp / files["router_test"].name, x=xe[n:], y=ye[n:])
    meta = {"fingerprint": fp, "eval_accuracy": acc, "train_images": int(len(xt)), **CLOUD_RECIPE}
    (tmp / files["meta"].name).write_text(json.dumps(meta, indent=2))
    for key in ("model", "onnx", "router_calib", "router_test", "meta"):  # meta last: it marks the cache complete
        os.replace(tmp / files[key].name, files[key])
    tmp.rmdir()
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="Retrain even if cached.")
    args = ap.parse_args(argv)
    files = ensure_cloud_model(args.out, args.force)
    meta = json.loads(files["meta"].read_text())
    print(f"MNIST cloud model: float accuracy {meta['eval_accuracy'] * 100:.2f}% on the 1,000 held-out images")
    for k in ("model", "onnx", "router_calib", "router_test"):
        print(f"  {k}: {files[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
