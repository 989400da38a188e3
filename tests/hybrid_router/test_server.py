"""The cloud server as a real process: KServe v2 routes, provider reporting, bad input as 400, batching, 429 when full."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import numpy as np
import pytest
from router_support import cloud_server


def _body(x: np.ndarray, name: str = "input", datatype: str = "FP32", shape=None) -> dict:
    return {"inputs": [{"name": name, "shape": list(shape or x.shape), "datatype": datatype, "data": x.ravel().tolist()}]}


def test_health_metadata_and_provider(cloud: str) -> None:
    assert httpx.get(f"{cloud}/v2/health/live").json() == {"live": True}
    ready = httpx.get(f"{cloud}/v2/health/ready")
    assert ready.status_code == 200
    meta = httpx.get(f"{cloud}/v2/models/digits").json()
    assert meta["name"] == "digits" and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8, 8, 1]}]
    assert meta["parameters"]["execution_provider"] == "CPUExecutionProvider"  # no GPU here; said, not assumed
    assert ready.headers["x-edgekit-provider"] == "CPUExecutionProvider"
    assert httpx.get(f"{cloud}/v2/models/digits/ready").json()["ready"] is True
    assert httpx.get(f"{cloud}/v2").json()["name"] == "edgekit-cloud"


def test_infer_matches_onnx_runtime_with_id_and_version(cloud: str, digits_cloud) -> None:
    import onnxruntime as ort

    x = np.random.default_rng(0).uniform(size=(3, 8, 8, 1)).astype(np.float32)
    r = httpx.post(f"{cloud}/v2/models/digits/versions/1/infer", json={**_body(x), "id": "req-7"})
    assert r.status_code == 200
    out = r.json()
    assert out["id"] == "req-7" and out["model_name"] == "digits"
    got = np.asarray(out["outputs"][0]["data"], dtype=np.float32).reshape(out["outputs"][0]["shape"])
    s = ort.InferenceSession(str(digits_cloud["onnx"]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, s.run(None, {"input": x})[0], atol=1e-5)
    assert r.headers["x-edgekit-provider"] == "CPUExecutionProvider"


@pytest.mark.parametrize("body,fragment", [
    (_body(np.zeros((1, 8, 8), np.float32)), "does not fit"),
    (_body(np.zeros((1, 8, 8, 2), np.float32)), "does not fit"),
    (_body(np.zeros((1, 8, 8, 1), np.float32), datatype="INT8"), "datatype INT8"),
    (_body(np.zeros((1, 8, 8, 1), np.float32), name="pixels"), "unknown input"),
    (_body(np.zeros((1, 10), np.float32), shape=[1, 8, 8, 1]), "values"),
    ({"inputs": [{"name": "input", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": ["a"] * 64}]}, "not FP32"),
    ({"inputs": []}, "1 input"),
    ({"nothing": 1}, "inputs"),
])
def test_bad_input_is_400_with_a_message(cloud: str, body: dict, fragment: str) -> None:
    r = httpx.post(f"{cloud}/v2/models/digits/infer", json=body)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]


def test_garbage_body_is_400_and_unknown_model_is_404(cloud: str) -> None:
    r = httpx.post(f"{cloud}/v2/models/digits/infer", content=b"\xff\x00garbage")
    assert r.status_code == 400 and "error" in r.json()
    assert httpx.post(f"{cloud}/v2/models/nope/infer", json={}).status_code == 404
    assert httpx.get(f"{cloud}/v2/models/digits/versions/9").status_code == 404


def test_concurrent_requests_are_batched_and_metrics_show_it(cloud: str) -> None:
    x = np.random.default_rng(1).uniform(size=(1, 8, 8, 1)).astype(np.float32)
    before = _metric(cloud, "edgekit_cloud_batch_size_count")
    with httpx.Client() as c, concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: c.post(f"{cloud}/v2/models/digits/infer", json=_body(x)).status_code, range(200)))
    assert codes == [200] * 200
    batches = _metric(cloud, "edgekit_cloud_batch_size_count") - before
    assert 0 < batches < 200  # fewer model calls than requests
    text = httpx.get(f"{cloud}/metrics").text
    for name in ("edgekit_cloud_queue_depth", "edgekit_cloud_request_latency_seconds_bucket", "edgekit_cloud_inference_seconds_bucket"):
        assert name in text


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_full_queue_answers_429_with_retry_after(digits_cloud) -> None:
    x = np.zeros((1, 8, 8, 1), np.float32)
    with cloud_server(digits_cloud["onnx"], "digits", "--max-batch", "1", "--max-queue", "1") as (url, _):
        with httpx.Client(limits=httpx.Limits(max_connections=64)) as c, concurrent.futures.ThreadPoolExecutor(48) as pool:
            rs = list(pool.map(lambda _: c.post(f"{url}/v2/models/digits/infer", json=_body(x)), range(300)))
    codes = {r.status_code for r in rs}
    assert codes <= {200, 429}
    full = [r for r in rs if r.status_code == 429]
    assert full, "48 concurrent clients against a queue of 1 must see 429"
    assert full[0].headers["retry-after"] == "1" and "overloaded" in full[0].json()["error"]


def test_required_provider_that_is_missing_refuses_to_start(digits_cloud) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())", "cloud", "serve",
                        str(digits_cloud["onnx"]), "--name", "digits", "--port", "1", "--providers", "CUDAExecutionProvider"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 6
    assert "CUDAExecutionProvider" in r.stderr and "Hint:" in r.stderr


def test_keras_model_is_served_through_a_cached_onnx_export(digits_cloud, tmp_path, monkeypatch) -> None:
    from hybrid_router.cloud_model import OnnxCloudModel, resolve_onnx

    monkeypatch.setenv("EDGEKIT_CACHE_DIR", str(tmp_path))
    path = resolve_onnx(digits_cloud["keras"])
    assert path.parent == tmp_path / "cloud-onnx" and path.exists()
    assert resolve_onnx(digits_cloud["keras"]) == path  # cached
    x = np.random.default_rng(2).uniform(size=(4, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(OnnxCloudModel(digits_cloud["keras"]).predict(x), OnnxCloudModel(digits_cloud["onnx"]).predict(x), atol=1e-5)


def _binary(x: np.ndarray, size: int | None = None, header_len: int | None = None) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes if size is None else size}}]}).encode()
    return header + x.tobytes(), {"inference-header-content-length": str(len(header) if header_len is None else header_len)}


def test_binary_tensor_extension(cloud: str) -> None:
    x = np.random.default_rng(3).uniform(size=(2, 8, 8, 1)).astype(np.float32)
    body, headers = _binary(x)
    r = httpx.post(f"{cloud}/v2/models/digits/infer", content=body, headers=headers)
    j = httpx.post(f"{cloud}/v2/models/digits/infer", json=_body(x))
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == j.json()["outputs"][0]["data"]


@pytest.mark.parametrize("size,header_len,fragment", [(100, None, "binary_data_size"), (None, 10_000, "does not fit"),
                                                      (None, "x", "not a number")])
def test_bad_binary_requests_are_400(cloud: str, size, header_len, fragment: str) -> None:
    x = np.zeros((1, 8, 8, 1), np.float32)
    body, headers = _binary(x, size, None if header_len == "x" else header_len)
    if header_len == "x":
        headers = {"inference-header-content-length": "x"}
    r = httpx.post(f"{cloud}/v2/models/digits/infer", content=body, headers=headers)
    assert r.status_code == 400 and fragment in r.json()["error"]


def test_a_fixed_batch_model_is_served_request_by_request(tmp_path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(4).normal(size=(64, 10)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["z"]),
             helper.make_node("Softmax", ["z"], ["probs"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8, 8, 1])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 10])], [numpy_helper.from_array(w, "w")])
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = np.zeros((1, 8, 8, 1), np.float32)
    with cloud_server(path, "fixed") as (url, _):
        with httpx.Client() as c, concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: c.post(f"{url}/v2/models/fixed/infer", json=_body(x)).status_code, range(40)))
        two = httpx.post(f"{url}/v2/models/fixed/infer", json=_body(np.zeros((2, 8, 8, 1), np.float32)))
        assert codes == [200] * 40
        assert _metric(url, "edgekit_cloud_batch_size_sum") == _metric(url, "edgekit_cloud_batch_size_count") == 40
    assert two.status_code == 400 and "does not fit" in two.json()["error"]
