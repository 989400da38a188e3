"""The KServe v2 client against a real cloud server and against real misbehaving HTTP servers."""

from __future__ import annotations

import time

import numpy as np
import pytest

from hybrid_router.client import CloudFailure, KServeClient


def _x(n: int = 1) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, size=(n, 8, 8, 1)).astype(np.float32)


def test_infer_against_the_real_server_matches_onnx_runtime(cloud: str, digits_cloud) -> None:
    import onnxruntime as ort

    s = ort.InferenceSession(str(digits_cloud["onnx"]), providers=["CPUExecutionProvider"])
    x = _x(5)
    with KServeClient(cloud, "digits") as c:
        r = c.infer(x, time.monotonic() + 10)
        meta = c.metadata()
    np.testing.assert_allclose(r.outputs, s.run(None, {"input": x})[0], atol=1e-5)
    assert r.attempts == 1
    assert r.provider == "CPUExecutionProvider" == meta["parameters"]["execution_provider"]
    assert meta["inputs"][0]["name"] == "input"


@pytest.mark.parametrize("mode,reason", [("500", "bad_response"), ("503", "overloaded"), ("429", "overloaded"), ("404", "bad_response"),
                                         ("garbage", "bad_response"), ("wrong_shape", "bad_response")])
def test_failures_have_a_reason(bad_cloud, mode: str, reason: str) -> None:
    bad_cloud.mode = mode
    with KServeClient(bad_cloud.url, "digits", input_name="input") as c:
        with pytest.raises(CloudFailure) as e:
            c.infer(_x(), time.monotonic() + 5)
    assert e.value.reason == reason


@pytest.mark.parametrize("mode,posts", [("500", 2), ("429", 1), ("503", 1), ("garbage", 1)])
def test_retries_once_and_only_what_a_retry_can_fix(bad_cloud, mode: str, posts: int) -> None:
    bad_cloud.mode = mode
    with KServeClient(bad_cloud.url, "digits", input_name="input") as c, pytest.raises(CloudFailure):
        c.infer(_x(), time.monotonic() + 5)
    assert bad_cloud.posts == posts


def test_a_retry_can_succeed(bad_cloud) -> None:
    bad_cloud.mode = "flaky"
    with KServeClient(bad_cloud.url, "digits", input_name="input") as c:
        r = c.infer(_x(), time.monotonic() + 5)
    assert r.attempts == 2 and r.outputs.argmax() == 3


def test_no_retry_without_time_left(bad_cloud) -> None:
    bad_cloud.mode = "500"
    with KServeClient(bad_cloud.url, "digits", input_name="input", min_retry_ms=10_000) as c, pytest.raises(CloudFailure):
        c.infer(_x(), time.monotonic() + 5)
    assert bad_cloud.posts == 1


def test_refused_connection_is_unreachable(refused_url: str) -> None:
    with KServeClient(refused_url, "digits", input_name="input") as c, pytest.raises(CloudFailure) as e:
        c.infer(_x(), time.monotonic() + 2)
    assert e.value.reason == "unreachable"


def test_a_hanging_server_costs_the_deadline_not_more(bad_cloud) -> None:
    bad_cloud.mode = "hang"
    deadline_s = 0.3
    with KServeClient(bad_cloud.url, "digits", input_name="input") as c:
        t0 = time.monotonic()
        with pytest.raises(CloudFailure) as e:
            c.infer(_x(), t0 + deadline_s)
        took = time.monotonic() - t0
    assert e.value.reason == "timeout"
    assert deadline_s <= took < deadline_s + 0.25  # behavioural bound, generous for a loaded box


def test_input_name_comes_from_the_metadata(bad_cloud) -> None:
    with KServeClient(bad_cloud.url, "digits") as c:
        c.infer(_x(), time.monotonic() + 5)
        assert c.contract().input_name == "input" and c.contract().classes == 10


def test_a_deadline_already_past_fails_at_once(bad_cloud) -> None:
    with KServeClient(bad_cloud.url, "digits", input_name="input") as c, pytest.raises(CloudFailure) as e:
        c.infer(_x(), time.monotonic() - 1)
    assert e.value.reason == "timeout" and bad_cloud.posts == 0


@pytest.mark.parametrize("binary", [True, False])
def test_binary_and_json_inputs_give_the_same_answer(cloud: str, binary: bool) -> None:
    x = _x(3)
    with KServeClient(cloud, "digits", binary=binary) as c, KServeClient(cloud, "digits", binary=not binary) as other:
        np.testing.assert_array_equal(c.infer(x, time.monotonic() + 10).outputs, other.infer(x, time.monotonic() + 10).outputs)
