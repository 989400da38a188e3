"""Fixtures for the hybrid router: a digits cloud model, a calibrated bundle, a real cloud server, misbehaving clouds."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from router_support import ROOT, Misbehaving, cloud_server, device_bundle_for, free_port

CACHE = ROOT / ".cache" / "tests"


@pytest.fixture(scope="session")
def digits_cloud(digits: dict[str, Path]) -> dict[str, Path]:
    """A wider float CNN on the same digits train split, as ONNX, plus router calib/test splits of the held-out data (cached)."""
    d = CACHE / "router-digits-cloud-v1"
    files = {"onnx": d / "cloud.onnx", "keras": d / "cloud.keras", "calib": d / "router_calib.npz", "test": d / "router_test.npz"}
    if all(p.exists() for p in files.values()):
        return files
    import keras

    from sklearn.datasets import load_digits

    from hybrid_router.cloud_model import export_keras_onnx

    # The same seeded split as tests/conftest.py's digits fixture: the 400 held-out images are unseen by both models.
    d_ = load_digits()
    x = (d_.images / 16.0).astype(np.float32)[..., None]
    y = d_.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(x))
    ev, tr = idx[:400], idx[400:]
    parts = {"train": (x[tr], y[tr]), "eval": (x[ev], y[ev])}
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(*parts["train"], epochs=25, batch_size=32, verbose=0)
    tmp = d.with_name(d.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save(tmp / "cloud.keras")
    export_keras_onnx(model, tmp / "cloud.onnx")
    xe, ye = parts["eval"]
    np.savez(tmp / "router_calib.npz", x=xe[:300], y=ye[:300])
    np.savez(tmp / "router_test.npz", x=xe[300:], y=ye[300:])
    os.replace(tmp, d)
    return files


@pytest.fixture(scope="session")
def device_bundle(digits: dict[str, Path]) -> Path:
    """The digits INT8 TFLite bundle for raspberry-pi-5 (no router policy, no logits output): router_support.device_bundle_for."""
    return device_bundle_for(digits)


@pytest.fixture(scope="session")
def calibrated(device_bundle: Path, digits_cloud: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """A bundle calibrated with --escalation-budget 0.3 on the digits router split (the real calibration code)."""
    from hybrid_router.calibrate import calibrate_router

    out = tmp_path_factory.mktemp("calibrated")
    return calibrate_router(device_bundle, digits_cloud["onnx"], digits_cloud["calib"], out, escalation_budget=0.3)


@pytest.fixture(scope="session")
def cloud(digits_cloud: dict[str, Path]) -> Iterator[str]:
    """A real cloud server for the digits cloud model, shared by the session; yields its URL."""
    with cloud_server(digits_cloud["onnx"], "digits") as (url, _proc):
        yield url


@pytest.fixture()
def bad_cloud() -> Iterator[ThreadingHTTPServer]:
    """A misbehaving cloud; set ``.mode`` (hang, 500, 503, 429, garbage, wrong_shape, flaky, ok). ``.url`` is its address."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    server.daemon_threads = True
    server.mode = "ok"
    server.posts = 0
    server.lock = threading.Lock()
    server.release = threading.Event()
    server.trickle_done, server.trickle_aborted = threading.Event(), threading.Event()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture()
def refused_url() -> str:
    """An address where nothing listens: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"
