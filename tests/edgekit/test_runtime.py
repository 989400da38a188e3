"""edgekit.runtime: float in, float out, with the manifest's quantization, on real LiteRT."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edgekit import runtime
from edgekit.bundle import open_bundle
from edgekit.errors import BundleError, InputError
from edgekit.manifest import QuantParams, TensorSpec


def test_quantize_round_trip_and_saturation() -> None:
    spec = TensorSpec(name="x", shape=(1, 4), dtype="int8", quantization=QuantParams(scale=0.5, zero_point=-3))
    x = np.array([[0.0, 1.0, -1.25, 1000.0]], dtype=np.float32)
    q = runtime.quantize(x, spec)
    assert q.dtype == np.int8 and q.tolist() == [[-3, -1, -6, 127]]
    one = TensorSpec(name="x", shape=(1, 3), dtype="int8", quantization=QuantParams(scale=1.0, zero_point=0))
    assert runtime.quantize(np.array([[0.49999997, 0.5, -0.5]], np.float32), one).tolist() == [[0, 1, -1]]  # std::round, not float32 v + 0.5
    back = runtime.dequantize(q, spec)
    assert np.allclose(back[0, :2], [0.0, 1.0]) and back[0, 3] == pytest.approx(65.0)
    u = TensorSpec(name="x", shape=(1, 2), dtype="uint8", quantization=QuantParams(scale=1 / 255, zero_point=0))
    assert runtime.quantize(np.array([[-1.0, 2.0]]), u).tolist() == [[0, 255]]


@pytest.mark.parametrize("profile", ["raspberry-pi-5", "coral-edgetpu"])
def test_load_reproduces_the_golden_set(digits_bundles, profile: str) -> None:
    r = next(r for r in digits_bundles.results if r.profile == profile)
    model = runtime.load(r.bundle_dir)
    g = open_bundle(r.bundle_dir).golden()
    out = model.predict(g["x"])
    assert out.dtype == np.float32 and out.shape == g["y_host"].shape
    assert np.abs(out - g["y_host"]).max() <= r.manifest.golden.atol
    assert (out.argmax(-1) == g["y_float"].argmax(-1)).mean() >= 0.9
    assert model.inputs[0].dtype == ("uint8" if profile == "coral-edgetpu" else "int8")
    one = model.predict_one(g["x"][0])
    assert np.allclose(one, out[0])


def test_wrong_input_shape_is_a_clear_error(digits_bundles) -> None:
    model = runtime.load(digits_bundles.results[0].bundle_dir)
    with pytest.raises(InputError, match="does not fit the model input"):
        model.predict(np.zeros((2, 9, 9, 1), np.float32))


def test_changed_model_file_refuses_to_load(digits_bundles, tmp_path: Path) -> None:
    src = digits_bundles.results[0].bundle_dir
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    f = dst / open_bundle(dst).manifest.file
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        runtime.load(dst)


def test_bench_command(digits_bundles, run_cli) -> None:
    import json

    code, out, _ = run_cli("bench", digits_bundles.results[0].bundle_dir, "--runs", "30", "--threads", "1", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["runs"] == 30 and r["threads"] == 1 and r["runtime"].startswith("litert")
    assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] and r["load_ms"] > 0


def test_run_returns_every_output_by_name_and_matches_predict(digits_bundles) -> None:
    model = runtime.load(digits_bundles.results[0].bundle_dir)
    g = open_bundle(digits_bundles.results[0].bundle_dir).golden()
    name = model.inputs[0].name
    outs = model.run({name: g["x"]})
    assert list(outs) == [s.name for s in model.outputs]
    assert np.array_equal(outs[model.outputs[0].name], model.predict(g["x"]))


def test_run_refuses_feeds_that_do_not_name_the_inputs(digits_bundles) -> None:
    model = runtime.load(digits_bundles.results[0].bundle_dir)
    with pytest.raises(InputError, match="missing"):
        model.run({"nope": np.zeros((1, 8, 8, 1), np.float32)})
