"""ONNX as it exists in the wild: the onnx wheel's IR-3 zoo models, external data, impossible (profile, format) pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converters.onnx_source import normalise_onnx
from edgekit import runtime
from edgekit.bundle import open_bundle
from edgekit.golden import check_golden


def _zoo(name: str) -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"


@pytest.fixture(scope="module")
def zoo_calib(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("zoo") / "calib.npz"
    np.savez(f, x=np.random.default_rng(0).uniform(0, 1, size=(20, 3, 224, 224)).astype(np.float32))
    return f


def test_ir3_normalisation_folds_initializer_inputs_and_upgrades_the_opset() -> None:
    import onnx

    m = onnx.load(str(_zoo("squeezenet")))
    assert m.ir_version == 3 and len(m.graph.input) > 1
    fixed, notes = normalise_onnx(m)
    assert [v.name for v in fixed.graph.input] == ["data_0"]
    assert fixed.ir_version >= 4 and max(o.version for o in fixed.opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert any("folded" in n for n in notes) and any("upgraded to 13" in n for n in notes)
    onnx.checker.check_model(fixed)


def test_ir3_zoo_model_converts_for_two_profiles(zoo_calib: Path, tmp_path: Path, run_cli) -> None:
    code, out, err = run_cli("convert", _zoo("squeezenet"), "--profile", "raspberry-pi-5", "--profile", "pixel-8", "--calibration", zoo_calib,
                             "--out", tmp_path / "o", "--latency-runs", "2", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert {(r["profile"], r["format"]) for r in rep["results"]} == {("raspberry-pi-5", "onnx"), ("pixel-8", "onnx")}
    assert rep["task"] == "classification"  # (N, 1000, 1, 1): the class axis is found from the shape
    # The zoo's constant weights make every output the same: the report must say the checks are meaningless.
    assert any("identical for every evaluation input" in w for w in rep["warnings"])
    assert any("no tflite bundle" in w for w in rep["warnings"])
    # The zoo's light models build their weights with ConstantOfShape at run time: the INT8 file, which stores them, is larger.
    assert all(any("computes its weights at run time" in w for w in r["warnings"]) for r in rep["results"])
    for r in rep["results"]:
        assert "min_sqnr_db" in r["metrics"] and r["metrics"]["activation_bytes"]["value"] > 0
        assert any("IR version 3" in v for v in r["verification"])
        assert check_golden(runtime.load(r["bundle"]), open_bundle(r["bundle"])).passed


def test_coral_from_onnx_is_an_error_before_any_work(zoo_calib: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "o"
    code, _, err = run_cli("convert", _zoo("squeezenet"), "--profile", "pixel-8", "--profile", "coral-edgetpu", "--calibration", zoo_calib,
                           "--out", out)
    assert code == 4 and "coral-edgetpu" in err and "Hint:" in err and "Traceback" not in err
    assert "running the float model" not in err  # refused before the slow part
    assert not out.exists()


def test_external_data_model(tmp_path: Path, zoo_calib: Path, run_cli) -> None:
    import onnx

    m, _ = normalise_onnx(onnx.load(str(_zoo("squeezenet"))))
    ext = tmp_path / "ext" / "model.onnx"
    ext.parent.mkdir()
    onnx.save(m, str(ext), save_as_external_data=True, all_tensors_to_one_file=True, location="model.data", size_threshold=0)
    assert (ext.parent / "model.data").stat().st_size > 0
    code, _, err = run_cli("convert", ext, "--profile", "raspberry-pi-5", "--calibration", zoo_calib, "--out", tmp_path / "o1", "--latency-runs", "2")
    assert code == 0, err
    (ext.parent / "model.data").unlink()
    out = tmp_path / "o2"
    code, _, err = run_cli("convert", ext, "--profile", "raspberry-pi-5", "--calibration", zoo_calib, "--out", out)
    assert code == 3 and "model.data" in err and "missing" in err and "Hint:" in err and "Traceback" not in err
    assert not out.exists()


def test_input_shape_naming_an_unknown_onnx_input(zoo_calib: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "o"
    code, _, err = run_cli("convert", _zoo("squeezenet"), "--profile", "pixel-8", "--calibration", zoo_calib, "--out", out,
                           "--input-shape", "images=1,3,224,224")
    assert code == 2 and "'images'" in err and "data_0" in err and "Hint:" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("method", ["MinMax", "Entropy"])
def test_streamed_calibration_gives_the_same_ranges(tmp_path: Path, method: str) -> None:
    """CalibStridedMinMax chunks must see every example (ORT 1.32's CalibMaxIntermediateOutputs silently dropped them)."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    from converters.onnx_calibration import CalibrationReader

    m, _ = normalise_onnx(onnx.load(str(_zoo("squeezenet"))))
    src = tmp_path / "sq.onnx"
    onnx.save(m, str(src))
    x = np.random.default_rng(1).uniform(0, 1, size=(6, 3, 224, 224)).astype(np.float32)
    x[5] *= 3  # the widest range is in the last chunk's last example

    def scales(extra: dict) -> dict[str, float]:
        out = tmp_path / f"q{len(extra)}.onnx"
        quantize_static(str(src), str(out), CalibrationReader({"data_0": x}), quant_format=QuantFormat.QDQ,
                        calibrate_method=getattr(CalibrationMethod, method), extra_options=extra)
        g = onnx.load(str(out)).graph
        return {i.name: float(numpy_helper.to_array(i)) for i in g.initializer if i.name.endswith("_scale") and not i.dims}

    whole, streamed = scales({}), scales({"CalibStridedMinMax": 2})
    assert whole and whole.keys() == streamed.keys()
    if method == "MinMax":
        assert all(np.isclose(whole[k], streamed[k], rtol=1e-6) for k in whole)
