"""Fixtures for the hybrid router: a digits cloud model, a calibrated bundle, a real cloud server, misbehaving clouds."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    import httpx

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"cloud server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v2/health/ready", timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("cloud server not ready in time")


@contextlib.contextmanager
def cloud_server(model: Path, name: str = "digits", *extra: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real `edgekit cloud serve` process on a free port; yields (url, process)."""
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())", "cloud", "serve", str(model),
           "--name", name, "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


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
def device_bundle(digits_bundles) -> Path:
    """The digits INT8 TFLite bundle (no router policy)."""
    return next(r.bundle_dir for r in digits_bundles.results if r.profile == "raspberry-pi-5")


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


class Misbehaving(BaseHTTPRequestHandler):
    """A real HTTP server that answers inference the wrong way, per ``server.mode``."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self._send(200, json.dumps({"name": "digits", "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 8, 8, 1]}],
                                    "outputs": [{"name": "out", "datatype": "FP32", "shape": [-1, 10]}]}).encode())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        server = self.server
        with server.lock:
            server.posts += 1
        mode = server.mode
        if mode == "hang":
            server.release.wait(30)
            self._send(200, b"{}")
        elif mode in ("500", "503", "429", "404"):
            self._send(int(mode), json.dumps({"error": f"mode {mode}"}).encode(), {"Retry-After": "1"} if mode in ("429", "503") else {})
        elif mode == "garbage":
            self._send(200, b"\x00not json at all")
        elif mode == "wrong_shape":
            self._send(200, json.dumps({"outputs": [{"name": "out", "datatype": "FP32", "shape": [3, 10], "data": [0.1] * 30}]}).encode())
        elif mode == "flaky":  # first POST fails with 500, then answers correctly
            if server.posts == 1:
                self._send(500, b'{"error": "flaky"}')
            else:
                self._ok()
        else:
            self._ok()

    def _ok(self) -> None:
        out = np.full((1, 10), 0.01, dtype=np.float32)
        out[0, 3] = 0.91
        self._send(200, json.dumps({"outputs": [{"name": "out", "datatype": "FP32", "shape": [1, 10], "data": out.ravel().tolist()}]}).encode())

    def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture()
def bad_cloud() -> Iterator[ThreadingHTTPServer]:
    """A misbehaving cloud; set ``.mode`` (hang, 500, 503, 429, garbage, wrong_shape, flaky, ok). ``.url`` is its address."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    server.daemon_threads = True
    server.mode = "ok"
    server.posts = 0
    server.lock = threading.Lock()
    server.release = threading.Event()
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
