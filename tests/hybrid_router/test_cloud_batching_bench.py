"""bench/cloud_batching.py's GPU path builds and serves without a GPU: the ResNet-50 model with a free batch axis on CPU, the
client sweep on CPU, and --provider cuda refused plainly where ONNX Runtime has no CUDA."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from router_support import cloud_server, free_port


def test_resnet50_with_a_free_batch_axis_serves_on_cpu_and_cuda_is_refused_plainly(run_cli, tmp_path: Path) -> None:
    import onnxruntime as ort

    from bench.cloud_batching import resnet50_model

    path = resnet50_model(tmp_path)
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(size=(2, 3, 224, 224)).astype(np.float32)
    want = s.run(None, {s.get_inputs()[0].name: x})[0]
    assert want.shape[0] == 2  # the batch axis is free: two rows in, two out
    with cloud_server(path, "resnet50", "--max-batch", "2") as (url, _):
        meta = httpx.get(f"{url}/v2/models/resnet50").json()
        body = {"inputs": [{"name": meta["inputs"][0]["name"], "shape": [2, 3, 224, 224], "datatype": "FP32", "data": x.ravel().tolist()}]}
        r = httpx.post(f"{url}/v2/models/resnet50/infer", json=body, timeout=60)
        assert r.status_code == 200 and r.headers["x-edgekit-provider"] == "CPUExecutionProvider"
        out = r.json()["outputs"][0]
        np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]), want, rtol=1e-4, atol=1e-4)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        code, _, err = run_cli("cloud", "serve", path, "--name", "resnet50", "--providers", "CUDAExecutionProvider,CPUExecutionProvider",
                               "--no-grpc", "--port", str(free_port()))
        assert code == 6 and "CUDAExecutionProvider" in err and "Hint:" in err


def test_the_client_sweep_measures_both_sides_at_each_count_on_cpu(tmp_path: Path) -> None:
    from bench.cloud_batching import run_sweep, zoo_model

    path = zoo_model(tmp_path, "squeezenet")
    sides = {"batched": ["--max-batch", "4", "--max-delay-us", "2000", "--providers", "CPUExecutionProvider"],
             "request-by-request": ["--max-batch", "1", "--providers", "CPUExecutionProvider"]}
    points, provider = run_sweep(path, sides, [1, 3], 0.3, 60.0, True)
    assert provider == "CPUExecutionProvider"
    for side in sides:
        assert [p["clients"] for p in points[side]] == [1, 3]
        for p in points[side]:
            assert p["steady"] and p["non_200"] == 0 and not p["client_errors"]
            assert p["answered"] >= 2 * p["clients"] and p["window_s"] >= 0.3  # the window holds two answers per client
            assert p["rps"] == pytest.approx(p["answered"] / p["window_s"], rel=0.05)  # window_s is rounded to 10 ms
            assert 0 < p["p50_ms"] <= p["p99_ms"]


def test_provider_cuda_without_cuda_is_an_error_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime as ort

    from bench.cloud_batching import main

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA")
    with pytest.raises(SystemExit) as e:
        main(["--provider", "cuda", "--sweep-only"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("Error: --provider cuda") and "CUDAExecutionProvider" in err and "\nHint: " in err
    assert main(["--sweep", "0,1", "--sweep-only"]) == 2 and "Error: --sweep" in capsys.readouterr().err
