"""Real multi-input / multi-output models for the converter tests, built once and cached under .cache/."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "tests" / "multi-io-v1"


def _save(name: str, model, arrays: dict[str, np.ndarray]) -> dict[str, Path]:
    d = CACHE / name
    files = {"model": d / f"{name}.keras", "calib": d / "calib.npz"}
    if all(p.exists() for p in files.values()):
        return files
    tmp = d.with_name(d.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save(tmp / files["model"].name)
    np.savez(tmp / "calib.npz", **arrays)
    if d.exists():
        import shutil

        shutil.rmtree(d)
    os.replace(tmp, d)
    return files


def _cached(name: str) -> dict[str, Path] | None:
    d = CACHE / name
    files = {"model": d / f"{name}.keras", "calib": d / "calib.npz"}
    return files if all(p.exists() for p in files.values()) else None


@pytest.fixture(scope="session")
def two_input_model() -> dict[str, Path]:
    """A classifier over two named float inputs ('feat' (N, 8) and 'ctx' (N, 4)) with three classes."""
    if (hit := _cached("two_input")) is not None:
        return hit
    import keras

    keras.utils.set_random_seed(1)
    a, b = keras.Input((8,), name="feat"), keras.Input((4,), name="ctx")
    h = keras.layers.Concatenate()([keras.layers.Dense(16, activation="relu")(a), keras.layers.Dense(8, activation="relu")(b)])
    model = keras.Model([a, b], keras.layers.Dense(3, activation="softmax")(h))
    rng = np.random.default_rng(1)
    feat, ctx = rng.normal(size=(120, 8)).astype(np.float32), rng.normal(size=(120, 4)).astype(np.float32)
    y = (feat[:, 0] + ctx[:, 0] > 0).astype(np.int64) + (feat[:, 1] > 1).astype(np.int64)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit([feat, ctx], y, epochs=20, verbose=0)
    return _save("two_input", model, {"feat": feat, "ctx": ctx, "y": y})


@pytest.fixture(scope="session")
def detector_model() -> dict[str, Path]:
    """A detector-style head: one image in, boxes (N, 6, 64) and objectness (N, 64) out (no class axis)."""
    if (hit := _cached("detector")) is not None:
        return hit
    import keras

    keras.utils.set_random_seed(2)
    x = keras.Input((16, 16, 3), name="image")
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(h)
    grid = keras.layers.Reshape((64, 16))(h)
    boxes = keras.layers.Permute((2, 1))(keras.layers.Dense(6)(grid))  # (N, 6, 64): YOLO's (N, 4 + classes, anchors) layout
    objectness = keras.layers.Reshape((64,))(keras.layers.Dense(1, activation="sigmoid")(grid))
    model = keras.Model(x, [boxes, objectness])
    image = np.random.default_rng(2).uniform(0, 1, size=(60, 16, 16, 3)).astype(np.float32)
    return _save("detector", model, {"x": image})


@pytest.fixture(scope="session")
def stateful_model() -> dict[str, Path]:
    """A stateful audio-style cell with three inputs: audio (N, 32) float, state (N, 16) float, sample rate (N, 1) int64."""
    if (hit := _cached("stateful")) is not None:
        return hit
    import keras

    keras.utils.set_random_seed(3)
    audio, state = keras.Input((32,), name="audio"), keras.Input((16,), name="state")
    sr = keras.Input((1,), name="sr", dtype="int64")
    rate = keras.layers.Rescaling(1 / 16000.0)(sr)  # casts the int64 rate to float inside the graph
    h = keras.layers.Concatenate()([keras.layers.Dense(16, activation="tanh")(audio), state, rate])
    new_state = keras.layers.Dense(16, activation="tanh", name="new_state")(h)
    speech = keras.layers.Dense(1, activation="sigmoid", name="speech")(new_state)
    model = keras.Model([audio, state, sr], [speech, new_state])
    rng = np.random.default_rng(3)
    n = 80
    arrays = {"audio": rng.normal(scale=0.3, size=(n, 32)).astype(np.float32), "state": rng.uniform(-1, 1, size=(n, 16)).astype(np.float32),
              "sr": rng.choice([8000, 16000], size=(n, 1)).astype(np.int64)}
    return _save("stateful", model, arrays)
