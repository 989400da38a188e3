"""--confidence-output: a classifier's pre-softmax logits kept as a second output beside the app's, on real converters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgekit.bundle import open_bundle, verify_bundle
from edgekit.golden import check_golden
from edgekit.manifest import CONFIDENCE_OUTPUT_METRIC
from edgekit.runtime import load

pytestmark = pytest.mark.timeout(600)


def _convert(digits: dict[str, Path], out: Path, mode: str, formats: tuple[str, ...], model: Path | None = None):
    from converters.pipeline import ConvertOptions, run_convert

    opts = ConvertOptions(model=model or digits["model"], profiles=("raspberry-pi-5",), formats=formats, calibration=digits["calib"],
                          eval=digits["eval"], out=out, name="digits", latency_runs=10, confidence_output=mode)
    return run_convert(opts)


@pytest.fixture(scope="module")
def with_logits(digits, tmp_path_factory):
    """The digits classifier converted with the default --confidence-output auto, TFLite and ONNX."""
    report = _convert(digits, tmp_path_factory.mktemp("with-logits"), "auto", ("tflite", "onnx"))
    return report, {r.format: r.bundle_dir for r in report.results}


@pytest.fixture(scope="module")
def without(digits, tmp_path_factory):
    """The same conversion with --confidence-output none (TFLite)."""
    report = _convert(digits, tmp_path_factory.mktemp("without"), "none", ("tflite",))
    return report.results[0].bundle_dir


def _float_logits(digits: dict[str, Path], x: np.ndarray) -> np.ndarray:
    """The float Keras model's logits: the last Dense layer's pre-activation, computed from its weights."""
    import keras

    m = keras.models.load_model(digits["model"], compile=False)
    hidden = keras.Model(m.inputs[0], m.layers[-2].output).predict(x, verbose=0)
    w, b = m.layers[-1].get_weights()
    return hidden @ w + b


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_the_logits_output_is_second_named_and_marked(with_logits, fmt: str) -> None:
    report, dirs = with_logits
    m = open_bundle(dirs[fmt]).manifest
    assert [o.name for o in m.outputs] == ["output_0", "output_1"]
    assert m.confidence_output is not None and m.confidence_output.name == "output_1"
    assert m.metrics[CONFIDENCE_OUTPUT_METRIC].value == 1 and "logits" in m.metrics[CONFIDENCE_OUTPUT_METRIC].note
    assert m.task == "classification" and m.labels == tuple(str(i) for i in range(10))
    # full-integer TFLite quantizes every output (the logits get their own int8 scale); ONNX QDQ keeps graph outputs float
    assert m.outputs[1].dtype == ("int8" if fmt == "tflite" else "float32")
    if fmt == "tflite":
        assert m.outputs[0].quantization.scale == pytest.approx(1 / 256) and m.outputs[1].quantization.scale > 1 / 256
    # the cost, measured: the same file without the output, and predict() / run() latency side by side
    size_without = m.metrics["confidence_output.size_bytes_without"]
    assert size_without.status == "measured" and 0 < size_without.value <= m.size_bytes
    for k in ("latency_ms_p50_with", "latency_ms_p50_without", "latency_ms_p50_router"):
        assert m.metrics[f"confidence_output.{k}"].status == "measured" and m.metrics[f"confidence_output.{k}"].value > 0
    assert any(v.startswith("confidence output cost on this conversion host") for v in m.verification)
    assert report.confidence_output["output"] == "output_1" and report.confidence_output["requested"] == "auto"
    assert "Dense" in report.confidence_output["found"]
    assert json.loads((report.out / "report.json").read_text())["confidence_output"]["output"] == "output_1"
    assert "confidence_output.size_bytes_without" in (report.out / "report.md").read_text()


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_logits_match_the_float_model_within_quantization_error(with_logits, digits, fmt: str) -> None:
    _, dirs = with_logits
    model = load(dirs[fmt])
    x = np.load(digits["eval"])["x"]
    z = model.run({model.inputs[0].name: x})["output_1"]
    ref = _float_logits(digits, x)
    assert z.shape == ref.shape == (len(x), 10)
    err = np.abs(z - ref)
    spread = float(ref.max() - ref.min())
    assert float(err.mean()) < spread / 255 * 2  # about a step of an int8 range over the logits, on average
    sqnr = 10 * np.log10((ref**2).sum() / ((z - ref) ** 2).sum())
    assert sqnr > 25
    assert float((z.argmax(1) == ref.argmax(1)).mean()) > 0.97
    if fmt == "tflite":
        q = model.manifest.outputs[1].quantization
        assert float(np.percentile(err, 99)) <= 4 * q.scale  # rounding of the logits plus the int8 path's error upstream
        # the resolution the int8 softmax loses: answers it saturates at 255/256 (all alike to it) still differ in their logits
        top = model.predict(x).max(axis=1)
        saturated = top >= top.max() - 1e-6
        assert saturated.sum() >= 20 and len(np.unique(z[saturated].max(axis=1))) >= saturated.sum() / 4


def test_the_app_output_is_unchanged_first_and_what_predict_returns(with_logits, without, digits) -> None:
    _, dirs = with_logits
    x = np.load(digits["eval"])["x"]
    a, b = load(dirs["tflite"]), load(without)
    assert [o.name for o in b.manifest.outputs] == ["output_0"] and b.manifest.confidence_output is None
    assert a.manifest.outputs[0] == b.manifest.outputs[0]  # same name, shape, dtype and scale
    pa, pb = a.predict(x), b.predict(x)
    assert pa.shape == (len(x), 10)
    np.testing.assert_array_equal(pa, a.run({a.inputs[0].name: x})["output_0"])
    np.testing.assert_allclose(pa.sum(axis=1), 1.0, atol=0.03)  # probabilities, not logits
    same_recipe = a.manifest.quantization.recipe == b.manifest.quantization.recipe  # the choice weighs host timing, so it may differ
    if same_recipe:  # the same int8 softmax: at most one step apart where calibration ranges differ in the last bit
        assert float(np.abs(pa - pb).max()) <= 1 / 256 + 1e-6
    assert float((pa.argmax(1) == pb.argmax(1)).mean()) >= (0.995 if same_recipe else 0.97)
    assert a.manifest.metrics["int8_accuracy"].value == pytest.approx(b.manifest.metrics["int8_accuracy"].value, abs=0.5)


def test_golden_check_and_agent_install_take_the_bundle(with_logits, run_cli, tmp_path: Path) -> None:
    _, dirs = with_logits
    for fmt in ("tflite", "onnx"):
        bundle = open_bundle(dirs[fmt])
        assert verify_bundle(dirs[fmt]).ok
        with np.load(bundle.root / bundle.manifest.golden.file) as g:
            assert {"y_host", "y_host_1", "y_float", "y_float_1"} <= set(g.files)  # the golden set covers every output
        check = check_golden(load(dirs[fmt]), bundle)
        assert check.passed and check.max_abs_err <= check.atol
    code, out, err = run_cli("agent", "install", dirs["tflite"], "--data-dir", tmp_path / "dev", "--profile", "raspberry-pi-5",
                             "--profile-runs", "20", "--profile-budget-s", "0.5", "--warmup", "2", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["ok"] and r["phases"] == ["verified", "profiled", "activated"] and r["profile"]["golden_passed"]


def test_golden_check_fails_when_the_logits_output_drifts(with_logits, tmp_path: Path) -> None:
    """Every output is checked: a wrong logits reference fails the golden set even though the app output agrees."""
    from edgekit import signing
    from edgekit.bundle import GOLDEN_FILE, write_bundle

    _, dirs = with_logits
    b = open_bundle(dirs["tflite"])
    golden = dict(b.golden())
    golden["y_host_1"] = golden["y_host_1"] + 1.0
    fields = b.manifest.model_dump(mode="json", exclude={"file", "sha256", "size_bytes", "extra_files", "golden"})
    bad = write_bundle(tmp_path / "bad", fields, b.model_path, golden, signing_key=signing.load_or_create_key(),
                       min_top1_agreement=b.manifest.golden.min_top1_agreement, atol=b.manifest.golden.atol)
    assert (bad.root / GOLDEN_FILE).exists()
    assert not check_golden(load(bad.root), bad).passed


def test_onnx_source_gets_a_logits_output(digits, tmp_path: Path) -> None:
    """An ONNX classifier ending in Softmax: its input becomes the graph output 'logits' (float)."""
    import keras
    import onnx

    from hybrid_router.cloud_model import export_keras_onnx

    src = tmp_path / "digits.onnx"
    export_keras_onnx(keras.models.load_model(digits["model"], compile=False), src)
    assert any(n.op_type == "Softmax" for n in onnx.load(str(src)).graph.node)
    report = _convert(digits, tmp_path / "out", "auto", ("onnx",), model=src)
    m = report.results[0].manifest
    assert len(m.outputs) == 2 and m.confidence_output is not None and m.confidence_output.name.startswith("logits")
    assert m.outputs[0].name == open_bundle(report.results[0].bundle_dir).manifest.outputs[0].name != m.confidence_output.name
    assert "Softmax" in report.confidence_output["found"]
    model = load(report.results[0].bundle_dir)
    x = np.load(digits["eval"])["x"][:50]
    z = model.run({model.inputs[0].name: x})[m.confidence_output.name]
    p = model.predict(x)
    soft = np.exp(z - z.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    np.testing.assert_allclose(soft, p, atol=0.02)  # the app's output is the softmax of the logits output


def test_logits_mode_refuses_a_model_without_softmax(tmp_path: Path, run_cli) -> None:
    import keras

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).random((64, 6)).astype(np.float32)
    m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])  # plain logits out: nothing to split
    m.save(tmp_path / "lin.keras")
    np.savez(tmp_path / "cal.npz", x=x)
    np.savez(tmp_path / "ev.npz", x=x, y=np.arange(64) % 4)
    args = ["convert", tmp_path / "lin.keras", "--profile", "raspberry-pi-5", "--format", "tflite", "--calibration", tmp_path / "cal.npz",
            "--eval", tmp_path / "ev.npz", "--latency-runs", "3"]
    code, _out, err = run_cli(*args, "--out", tmp_path / "a", "--confidence-output", "logits")
    assert code != 0 and "Error:" in err and "no softmax" in err and "Hint:" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    code, out, err = run_cli(*args, "--out", tmp_path / "b")  # auto: converted as it is, and the report says why
    assert code == 0, err
    flat = " ".join(out.split())  # rich wraps long lines
    assert "confidence output none:" in flat and "no softmax" in flat
    r = json.loads((tmp_path / "b" / "report.json").read_text())
    assert r["confidence_output"]["output"] is None and "no softmax" in r["confidence_output"]["note"]
    assert "confidence_output" not in r["results"][0]["metrics"]
    assert len(open_bundle(r["results"][0]["bundle"]).manifest.outputs) == 1
    code, _out, err = run_cli(*args, "--out", tmp_path / "c", "--confidence-output", "bogus")
    assert code == 2 and "bogus" in err


def test_the_manifest_gains_no_key_an_older_agent_would_refuse(with_logits, without) -> None:
    """The manifest models forbid unknown keys, so the marker lives in ``metrics`` (a name -> Metric map): apart from
    metric names, a bundle with the logits output has exactly the keys of one without, at every level."""
    _, dirs = with_logits

    def keys(d, path=""):
        if isinstance(d, dict):
            out = set()
            for k, v in d.items():
                here = f"{path}.*" if path.endswith("metrics") else f"{path}.{k}"
                out |= {here} | keys(v, here)
            return out
        if isinstance(d, list):
            return set().union(*(keys(v, path + "[]") for v in d)) if d else set()
        return set()

    a = json.loads((dirs["tflite"] / "manifest.json").read_text())
    b = json.loads((without / "manifest.json").read_text())
    assert keys(a) == keys(b)
    assert CONFIDENCE_OUTPUT_METRIC in a["metrics"] and CONFIDENCE_OUTPUT_METRIC not in b["metrics"]


def test_same_recipe_same_app_output(digits, tmp_path: Path) -> None:
    """With the recipe fixed (the run's choice weighs host timing), the two-output graph quantizes the app's path exactly as
    the one-output graph does: the INT8 softmax is the same, value for value."""
    from converters.confidence import with_confidence_output
    from converters.source import load_source
    from converters.tflite import TFLiteConverter
    from edgekit.profiles import find_profile
    from edgekit.runtime import load_model_file

    prof = find_profile("raspberry-pi-5")
    conv = TFLiteConverter()
    x = np.load(digits["eval"])["x"]
    plain = load_source(digits["model"], tmp_path)
    calib = {plain.input_names[0]: np.load(digits["calib"])["x"]}
    two, plan = with_confidence_output(load_source(digits["model"], tmp_path), "auto", "classification")
    assert plan.added and two.output_names == ("output_0", "output_1")
    recipe = conv.recipes(prof, 200, 500)[0]
    outs = []
    for name, src in (("one", plain), ("two", two)):
        d = tmp_path / name
        d.mkdir()
        m = load_model_file(conv.convert(src, prof, recipe, calib, d), "tflite")
        outs.append(m.run({m.inputs[0].name: x})["output_0"])
    np.testing.assert_array_equal(outs[0], outs[1])


def test_coreml_bundle_keeps_the_app_output_first(digits, tmp_path: Path) -> None:
    """Core ML cannot predict here, so the order is read from the ML Program: output 0 comes from the softmax, output 1 from
    the linear layer (the logits)."""
    import coremltools as ct

    from converters.pipeline import ConvertOptions, run_convert

    r = run_convert(ConvertOptions(model=digits["model"], profiles=("iphone-15-pro",), formats=("coreml",), calibration=digits["calib"],
                                   eval=digits["eval"], out=tmp_path / "out", name="digits", latency_runs=3)).results[0]
    m = r.manifest
    assert len(m.outputs) == 2 and m.confidence_output == m.outputs[1]
    assert m.metrics["confidence_output.size_bytes_without"].status == "not_measurable"
    spec = ct.utils.load_spec(str(r.bundle_dir / m.file))
    assert [o.name for o in spec.description.output] == [o.name for o in m.outputs]
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[next(iter(fn.block_specializations))]
    made_by = {o.name: op for op in block.operations for o in op.outputs}

    def source_op(name: str) -> str:
        op = made_by[name]
        while op.type == "cast":
            op = made_by[op.inputs["x"].arguments[0].name]
        return op.type

    assert [source_op(o) for o in block.outputs] == ["softmax", "linear"]


def test_pytorch_module_gets_a_logits_output(tmp_path: Path) -> None:
    """A torch module ending in softmax: the ExportedProgram is re-exported with the softmax's input as output 1."""
    torch = pytest.importorskip("torch")
    import edgekit

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4 * 6 * 6, 10)

        def forward(self, x):  # noqa: ANN001, ANN202
            return torch.softmax(self.fc(torch.relu(self.conv(x)).flatten(1)), dim=-1)

    torch.manual_seed(0)
    net = Net().eval()
    x = np.random.default_rng(0).random((64, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x)
    report = edgekit.convert(net, (torch.zeros(1, 1, 8, 8),), profiles=("raspberry-pi-5",), formats=("onnx",), calibration=tmp_path / "cal.npz",
                             out=tmp_path / "out", latency_runs=3)
    m = report.results[0].manifest
    assert report.confidence_output["output"] == "output_1" and "softmax" in report.confidence_output["found"]
    assert [o.name for o in m.outputs] == ["output_0", "output_1"] and m.confidence_output == m.outputs[1]
    model = load(report.results[0].bundle_dir)
    z = model.run({model.inputs[0].name: x})["output_1"]
    with torch.no_grad():
        ref = net.fc(torch.relu(net.conv(torch.from_numpy(x))).flatten(1)).numpy()
    assert 10 * np.log10((ref**2).sum() / ((z - ref) ** 2).sum()) > 25
    p = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(p / p.sum(1, keepdims=True), model.predict(x), atol=0.02)  # output 0 is the softmax of output 1
