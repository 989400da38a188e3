"""Shared fixtures: tiny real models built once per session and cached on disk under .cache/."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "tests"


@pytest.fixture(autouse=True, scope="session")
def _isolated_signing_key(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never write a signing key into the developer's home. The session's key is the publisher every test agent
    trusts for local installs (EDGEKIT_AGENT_TRUSTED_KEYS) and every test server allows (fleet_support)."""
    from edgekit import signing

    os.environ["EDGEKIT_SIGNING_KEY"] = str(tmp_path_factory.mktemp("keys") / "signing_key.pem")
    for name in ("EDGEKIT_SIGNING_KEY_PEM", "EDGEKIT_SIGNING_KEY_PASSPHRASE", "EDGEKIT_SIGNING_KEY_PASSPHRASE_FILE"):
        os.environ.pop(name, None)
    os.environ["EDGEKIT_AGENT_TRUSTED_KEYS"] = signing.public_key_b64(signing.load_or_create_key())


@pytest.fixture(autouse=True)
def _no_user_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEKIT_PROFILE_PATH", raising=False)


def _digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(x))
    ev, tr = idx[:400], idx[400:]
    return {"train": (x[tr], y[tr]), "calib": (x[tr[:200]], y[tr[:200]]), "eval": (x[ev], y[ev])}


@pytest.fixture(scope="session")
def digits() -> dict[str, Path]:
    """A small CNN on scikit-learn's bundled 8x8 digits, with calib.npz and eval.npz (cached)."""
    d = CACHE / "digits-v1"
    files = {"model": d / "digits.keras", "calib": d / "calib.npz", "eval": d / "eval.npz", "saved_model": d / "saved_model"}
    if all(p.exists() for p in files.values()):
        return files
    import keras

    keras.utils.set_random_seed(0)
    parts = _digits_split()
    # Explicit names, the ones a fresh process would give: Keras numbers automatic names per process, so a
    # model built earlier in the session would otherwise turn 'input_layer' into 'input_layer_1'.
    model = keras.Sequential([
        keras.Input((8, 8, 1), name="input_layer"),
        keras.layers.Conv2D(8, 3, activation="relu", name="conv2d"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(32, activation="relu", name="dense"),
        keras.layers.Dense(10, activation="softmax", name="dense_1"),
    ], name="sequential")
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(*parts["train"], epochs=15, batch_size=32, verbose=0)
    tmp = d.with_name(d.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save(tmp / files["model"].name)
    model.export(str(tmp / "saved_model"), verbose=False)
    np.savez(tmp / "calib.npz", x=parts["calib"][0], y=parts["calib"][1])
    np.savez(tmp / "eval.npz", x=parts["eval"][0], y=parts["eval"][1])
    os.replace(tmp, d)
    return files


@pytest.fixture(scope="session")
def digits_bundles(digits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """One real conversion run for two profiles (int8 I/O and uint8 I/O); returns the RunReport."""
    from converters.pipeline import ConvertOptions, run_convert

    out = tmp_path_factory.mktemp("bundles")
    opts = ConvertOptions(model=digits["model"], profiles=("raspberry-pi-5", "coral-edgetpu"), formats=("tflite",),
                          calibration=digits["calib"], eval=digits["eval"], out=out, name="digits", version="1.2.3", latency_runs=10)
    return run_convert(opts)


@pytest.fixture()
def run_cli(capsys: pytest.CaptureFixture[str]):
    """Run the edgekit CLI in-process; returns (exit_code, stdout, stderr)."""
    from edgekit.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
from fleet_support import *  # noqa: E402,F401,F403 - fleet server fixtures (live_server, fleet_db, ...)
