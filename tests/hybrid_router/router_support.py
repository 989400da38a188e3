"""Helpers for the router tests: free ports, a real `edgekit cloud serve` process, a real misbehaving HTTP server."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEVICE_BUNDLE_CACHE = ROOT / ".cache" / "tests" / "router-device-bundle-v2"


def device_bundle_for(digits: dict[str, Path]) -> Path:
    """The digits INT8 TFLite bundle for raspberry-pi-5 with the INT8 softmax as its only output (no logits output, no
    router policy), converted once by the real pipeline and cached; the router's and the e2e outage tests share it."""
    import os

    d = DEVICE_BUNDLE_CACHE
    if (d / "bundle" / "manifest.json").exists():
        return d / "bundle"
    from converters.pipeline import ConvertOptions, run_convert

    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    opts = ConvertOptions(model=digits["model"], profiles=("raspberry-pi-5",), formats=("tflite",), calibration=digits["calib"],
                          eval=digits["eval"], out=tmp / "out", name="digits", version="1.2.3", latency_runs=10,
                          confidence_output="none")  # the INT8 softmax alone (the logits output: test_calibrate_logits.py)
    report = run_convert(opts)
    os.replace(report.results[0].bundle_dir, tmp / "bundle")
    os.replace(tmp, d)
    return d / "bundle"


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
    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())", "cloud", "serve", str(model),
           "--name", name, "--port", str(port), "--grpc-port", str(grpc_port), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    proc.grpc_port = grpc_port  # type: ignore[attr-defined]
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


class Misbehaving(BaseHTTPRequestHandler):
    """A real HTTP server that answers inference the wrong way, per ``server.mode``."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        classes = getattr(self.server, "meta_classes", 10)
        self._send(200, json.dumps({"name": "digits", "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 8, 8, 1]}],
                                    "outputs": [{"name": "out", "datatype": "FP32", "shape": [-1, classes]}]}).encode())

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
        elif mode in ("classes20", "classes3"):  # metadata says 10, the answer has another class count
            k = int(mode[7:])
            self._send(200, json.dumps({"outputs": [{"name": "out", "datatype": "FP32", "shape": [1, k], "data": [1.0 / k] * k}]}).encode())
        elif mode == "huge":  # 2 million floats for one input (built by bytes repetition: ready at once)
            self._send(200, b'{"outputs": [{"name": "out", "datatype": "FP32", "shape": [1, 2000000], "data": ['
                       + b"0.5, " * 1_999_999 + b"0.5]}]}")
        elif mode == "huge_undeclared":  # the same, chunked (no content-length)
            self._chunked(b'{"outputs": [{"name": "out", "datatype": "FP32", "shape": [1, 10], "data": [' + b"0.5, " * 1_999_999
                          + b"0.5]}]}")
        elif mode == "midbody_close":  # promises 10,000 bytes, sends 100, closes
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", "10000")
            self.end_headers()
            self.wfile.write(b'{"outputs": [{"name": "out", "datatype": "FP32", "shape": [1, 10], "data": [0.1, 0.1, 0.1, ' + b" " * 40)
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
        elif mode == "trickle":  # a correct-looking answer, one byte every 20 ms (about 6 s in all)
            body = json.dumps({"outputs": [{"name": "out", "datatype": "FP32", "shape": [1, 10], "data": [0.1] * 10}]}).encode()
            try:
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.flush()
                for i in range(len(body)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.02)
                server.trickle_done.set()
            except (BrokenPipeError, ConnectionResetError):
                server.trickle_aborted.set()  # the client stopped reading and closed the connection
        elif mode == "nan":
            self._send(200, b'{"outputs": [{"name": "out", "datatype": "FP32", "shape": [1, 10], "data": [NaN, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]}]}')
        elif mode == "huge_int":
            self._send(200, json.dumps({"outputs": [{"name": "out", "datatype": "INT64", "shape": [1, 10], "data": [10**30] + [0] * 9}]}).encode())
        elif mode == "huge_int_meta":  # the datatype the metadata promises, values past it
            self._send(200, json.dumps({"outputs": [{"name": "out", "datatype": "FP32", "shape": [1, 10], "data": [10**400] + [0] * 9}]}).encode())
        elif mode == "other_model":  # a correct-looking answer from another model
            self._send(200, json.dumps({"model_name": "imagenet", "outputs": [{"name": "out", "datatype": "FP32", "shape": [1, 10],
                                                                               "data": [0.1] * 10}]}).encode())
        elif mode == "other_output":
            self._send(200, json.dumps({"outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 10], "data": [0.1] * 10}]}).encode())
        elif mode == "strings":
            self._send(200, json.dumps({"outputs": [{"name": "out", "datatype": "FP32", "shape": [1, 10], "data": ["0.1"] * 10}]}).encode())
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

    def _chunked(self, body: bytes) -> None:
        try:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 65536):
                part = body[i : i + 65536]
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

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
