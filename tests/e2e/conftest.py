"""Fixtures for the multi-process flows: a deliberately slow version of the digits model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "tests"


@pytest.fixture(scope="session")
def slow_digits_bundles(digits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """``digits`` 2.0.0: the same task through three 1024-wide Dense layers (about 30x the work per
    prediction), converted by the real pipeline for raspberry-pi-5 and coral-edgetpu. The Keras model
    is cached under .cache/tests/digits-slow-v1; returns the RunReport."""
    d = CACHE / "digits-slow-v1"
    model_path = d / "digits_slow.keras"
    if not model_path.exists():
        import keras

        keras.utils.set_random_seed(1)
        with np.load(digits["calib"]) as c:
            x, y = c["x"], c["y"]
        model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(1024, activation="relu"),
                                  keras.layers.Dense(1024, activation="relu"), keras.layers.Dense(1024, activation="relu"),
                                  keras.layers.Dense(10, activation="softmax")])
        model.compile("adam", "sparse_categorical_crossentropy")
        model.fit(x, y, epochs=3, batch_size=32, verbose=0)
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        model.save(tmp / model_path.name)
        os.replace(tmp, d)
    from converters.pipeline import ConvertOptions, run_convert

    out = tmp_path_factory.mktemp("slow-bundles")
    opts = ConvertOptions(model=model_path, profiles=("raspberry-pi-5", "coral-edgetpu"), formats=("tflite",), calibration=digits["calib"],
                          eval=digits["eval"], out=out, name="digits", version="2.0.0", latency_runs=10)
    return run_convert(opts)
