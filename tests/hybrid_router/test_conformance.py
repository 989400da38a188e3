"""Real KServe v2 clients against `edgekit cloud serve`: tritonclient over HTTP and gRPC, on every route the server offers.

One server process serves three model versions: the digits cloud model as versions 1 and 2, and
a detector-like model with free height/width, warmed up at a configured shape.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from router_support import ROOT, free_port, wait_ready

tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


def free_dims_model(path: Path, hint: str | None = None) -> Path:
    """A real ONNX graph with free height/width: images [N, 3, H, W] -> per-channel mean [N, 3]."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("ReduceMean", ["images", "axes"], ["means"], keepdims=0)
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("means", TensorProto.FLOAT, ["N", 3])], [axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if hint:
        helper.set_model_props(model, {"edgekit.warmup_shape": hint})
    onnx.save(model, path)
    return path


@contextlib.contextmanager
def serve(*args: str, ready: bool = True) -> Iterator[tuple[str, int, subprocess.Popen]]:
    port, gport = free_port(), free_port()
    cmd = [sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())", "cloud", "serve", *args,
           "--port", str(port), "--grpc-port", str(gport)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        if ready:
            wait_ready(url, proc)
        yield url, gport, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def multi(digits_cloud, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    det = free_dims_model(tmp_path_factory.mktemp("det") / "det.onnx")
    onnx = str(digits_cloud["onnx"])
    with serve("--model", f"digits:1={onnx}", "--model", f"digits:2={onnx}", "--model", f"det={det}",
               "--warmup-shape", "det=1x3x32x48", "--max-batch", "8") as (url, gport, _):
        yield url, gport


def _x(n: int = 2) -> np.ndarray:
    return np.random.default_rng(3).uniform(size=(n, 8, 8, 1)).astype(np.float32)


def _expected(digits_cloud, x: np.ndarray) -> tuple[str, np.ndarray]:
    import onnxruntime as ort

    s = ort.InferenceSession(str(digits_cloud["onnx"]), providers=["CPUExecutionProvider"])
    return s.get_outputs()[0].name, s.run(None, {"input": x})[0]


def test_tritonclient_http_every_route(multi, digits_cloud) -> None:
    url, _ = multi
    c = tritonclient_http.InferenceServerClient(url.removeprefix("http://"))
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("digits") and c.is_model_ready("digits", "2") and c.is_model_ready("det")
    assert c.get_server_metadata()["name"] == "edgekit-cloud"
    meta = c.get_model_metadata("digits")
    assert meta["versions"] == ["1", "2"] and meta["inputs"][0]["name"] == "input"
    assert c.get_model_metadata("digits", "1")["name"] == "digits"
    cfg = c.get_model_config("digits")
    assert cfg["max_batch_size"] == 8 and cfg["input"][0]["dims"] == [8, 8, 1] and cfg["input"][0]["data_type"] == "TYPE_FP32"
    index = {(m["name"], m["version"]): m["state"] for m in c.get_model_repository_index()}
    assert index == {("det", "1"): "READY", ("digits", "1"): "READY", ("digits", "2"): "READY"}
    out_name, want = _expected(digits_cloud, _x())
    for binary in (True, False):
        inp = tritonclient_http.InferInput("input", [2, 8, 8, 1], "FP32")
        inp.set_data_from_numpy(_x(), binary_data=binary)
        r = c.infer("digits", [inp], model_version="2", request_id="r-1",
                    outputs=[tritonclient_http.InferRequestedOutput(out_name, binary_data=binary)])
        np.testing.assert_allclose(r.as_numpy(out_name), want, atol=1e-5)
        assert r.get_response()["id"] == "r-1" and r.get_response()["model_version"] == "2"
    inp = tritonclient_http.InferInput("images", [1, 3, 5, 7], "FP32")  # any height/width
    img = np.random.default_rng(0).uniform(size=(1, 3, 5, 7)).astype(np.float32)
    inp.set_data_from_numpy(img)
    np.testing.assert_allclose(c.infer("det", [inp]).as_numpy("means"), img.mean(axis=(2, 3)), atol=1e-6)
    stats = c.get_inference_statistics("digits")["model_stats"]
    assert {s["version"] for s in stats} == {"1", "2"}
    assert sum(s["inference_stats"]["success"]["count"] for s in stats) >= 2
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        c.get_model_metadata("nope")
    with pytest.raises(InferenceServerException, match="unknown input"):
        bad = tritonclient_http.InferInput("pixels", [1, 8, 8, 1], "FP32")
        bad.set_data_from_numpy(_x(1))
        c.infer("digits", [bad])
    c.close()


def test_tritonclient_grpc_every_route(multi, digits_cloud) -> None:
    _, gport = multi
    g = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{gport}")
    assert g.is_server_live() and g.is_server_ready()
    assert g.is_model_ready("digits", "1") and g.is_model_ready("det")
    assert g.get_server_metadata().name == "edgekit-cloud"
    meta = g.get_model_metadata("digits")
    assert list(meta.versions) == ["1", "2"] and meta.inputs[0].name == "input" and list(meta.inputs[0].shape) == [-1, 8, 8, 1]
    cfg = g.get_model_config("digits").config
    assert cfg.name == "digits" and cfg.max_batch_size == 8 and list(cfg.input[0].dims) == [8, 8, 1]
    assert {(m.name, m.version, m.state) for m in g.get_model_repository_index().models} >= {("digits", "2", "READY")}
    out_name, want = _expected(digits_cloud, _x())
    inp = tritonclient_grpc.InferInput("input", [2, 8, 8, 1], "FP32")
    inp.set_data_from_numpy(_x())
    r = g.infer("digits", [inp], model_version="1", request_id="g-1", outputs=[tritonclient_grpc.InferRequestedOutput(out_name)])
    np.testing.assert_allclose(r.as_numpy(out_name), want, atol=1e-5)
    assert r.get_response().id == "g-1"
    stats = g.get_inference_statistics("digits", as_json=True)["model_stats"]
    assert {s["version"] for s in stats} == {"1", "2"}
    with pytest.raises(InferenceServerException, match="unknown model"):
        g.get_model_metadata("nope")
    with pytest.raises(InferenceServerException, match="does not fit"):
        bad = tritonclient_grpc.InferInput("input", [1, 8, 8, 2], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 8, 8, 2), np.float32))
        g.infer("digits", [bad])
    g.close()


def test_load_and_unload_over_http_and_grpc(digits_cloud) -> None:
    with serve(str(digits_cloud["onnx"]), "--name", "digits") as (url, gport, _):
        c = tritonclient_http.InferenceServerClient(url.removeprefix("http://"))
        g = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{gport}")
        c.unload_model("digits")
        assert not c.is_model_ready("digits")
        assert c.get_model_repository_index()[0]["state"] == "UNAVAILABLE"
        r = httpx.post(f"{url}/v2/models/digits/infer", json={"inputs": []})
        assert r.status_code == 503 and "unloaded" in r.json()["error"]
        g.load_model("digits")
        assert g.is_model_ready("digits") and c.is_server_ready()
        g.unload_model("digits")
        c.load_model("digits")
        assert c.is_model_ready("digits")
        with pytest.raises(InferenceServerException, match="failed to load 'nope'"):
            c.load_model("nope")
        c.close()
        g.close()


@pytest.mark.parametrize("path", ["/nope", "/v2/models/digits/nothing", "/v2/models/nope", "/v2/models/digits/versions/9/ready",
                                  "/v2/logging", "/v2/systemsharedmemory/status"])
def test_every_error_is_the_protocol_body(cloud: str, path: str) -> None:
    r = httpx.get(f"{cloud}{path}")
    assert r.status_code == 404 and set(r.json()) == {"error"} and r.json()["error"]
    r = httpx.delete(f"{cloud}/v2/models/digits")
    assert r.status_code in (404, 405) and set(r.json()) == {"error"}


def test_binary_output_on_request(cloud: str, digits_cloud) -> None:
    x = _x(1)
    out_name, want = _expected(digits_cloud, x)
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": x.ravel().tolist()}],
                         "parameters": {"binary_data_output": True}}).encode()
    r = httpx.post(f"{cloud}/v2/models/digits/infer", content=header)
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:n])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == len(r.content) - n == want.nbytes
    np.testing.assert_allclose(np.frombuffer(r.content[n:], "<f4").reshape(want.shape), want, atol=1e-5)


def test_free_dims_use_the_models_hint_or_fail_readiness_with_a_reason(tmp_path: Path) -> None:
    hinted = free_dims_model(tmp_path / "hinted.onnx", hint="1x3x16x16")
    with serve(str(hinted), "--name", "det") as (url, _, _):
        assert httpx.get(f"{url}/v2/models/det/ready").json()["ready"] is True
    bare = free_dims_model(tmp_path / "bare.onnx")
    with serve(str(bare), "--name", "det", ready=False) as (url, _, proc):
        body = None
        for _ in range(600):  # until warm-up has decided; a hang guard, not a timing bound
            with contextlib.suppress(httpx.HTTPError):
                body = httpx.get(f"{url}/v2/models/det/ready", timeout=2).json()
                if body["state"] != "LOADING":
                    break
            assert proc.poll() is None
            import time

            time.sleep(0.1)
        assert body is not None and body["ready"] is False and body["state"] == "UNAVAILABLE"
        assert "free axes [2, 3]" in body["reason"] and "--warmup-shape" in body["reason"]
        r = httpx.get(f"{url}/v2/health/ready")
        assert r.status_code == 503 and r.json()["models"][0]["reason"] == body["reason"]


@pytest.mark.parametrize("args,fragment", [
    (("--port", "70000"), "70000"),
    (("--host", "no-such-host.invalid"), "does not resolve"),
    (("--warmup-shape", "digits=1xax8"), "--warmup-shape"),
    (("--model", "broken"), "NAME[:VERSION]=PATH"),
])
def test_serve_bad_flags_are_error_and_hint(run_cli, digits_cloud, args, fragment: str) -> None:
    code, _, err = run_cli("cloud", "serve", digits_cloud["onnx"], "--name", "digits", *args)
    assert code == 2 and fragment in err and "Error:" in err and "Hint:" in err and "Traceback" not in err


def test_serve_on_a_busy_port_is_error_and_hint(run_cli, digits_cloud) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        code, _, err = run_cli("cloud", "serve", digits_cloud["onnx"], "--name", "digits", "--port", str(s.getsockname()[1]), "--no-grpc")
    assert code == 2 and "cannot listen on 127.0.0.1" in err and "Hint:" in err


def test_grpc_typed_contents_and_errors_with_the_raw_stub(multi, digits_cloud) -> None:
    """ModelInfer with InferTensorContents (what non-Triton KServe clients send), through the protocol's own stub."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    _, gport = multi
    x = _x(1)
    out_name, want = _expected(digits_cloud, x)
    with grpc.insecure_channel(f"127.0.0.1:{gport}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = service_pb2.ModelInferRequest(model_name="digits", id="t-1")
        req.inputs.add(name="input", datatype="FP32", shape=[1, 8, 8, 1]).contents.fp32_contents.extend(x.ravel().tolist())
        resp = stub.ModelInfer(req, timeout=30)
        assert resp.id == "t-1" and resp.outputs[0].name == out_name and list(resp.outputs[0].shape) == [1, 10]
        np.testing.assert_allclose(np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(want.shape), want, atol=1e-5)
        short = service_pb2.ModelInferRequest(model_name="digits")
        short.inputs.add(name="input", datatype="FP32", shape=[1, 8, 8, 1]).contents.fp32_contents.extend([0.0] * 10)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(short, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "64" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelReady(service_pb2.ModelReadyRequest(name="digits", version="7"), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            stub.SystemSharedMemoryStatus(service_pb2.SystemSharedMemoryStatusRequest(), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_default_grpc_port_taken_means_rest_only(digits_cloud) -> None:
    """Without --grpc-port the gRPC endpoint takes --port + 1 when free; taken, REST still serves (a warning says why)."""
    import socket

    for _ in range(20):  # a free port whose successor can be held
        port = free_port()
        holder = socket.socket()
        try:
            holder.bind(("127.0.0.1", port + 1))
            break
        except OSError:
            holder.close()
    holder.listen(1)
    cmd = [sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())", "cloud", "serve", str(digits_cloud["onnx"]),
           "--name", "digits", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
        holder.close()
    assert "no gRPC endpoint" in err
