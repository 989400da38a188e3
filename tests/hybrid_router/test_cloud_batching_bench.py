"""bench/cloud_batching.py's GPU path builds and serves without a GPU: the ResNet-50 model with a free batch axis on CPU."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
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
