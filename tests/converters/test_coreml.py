"""The Core ML converter on the real digits model with real coremltools: package, spec, int8 weights, checks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("coremltools")

from converters.base import ModelFacts  # noqa: E402
from converters.coreml import W8A8, W8A16, CoreMLConverter  # noqa: E402
from converters.source import SourceModel, load_source  # noqa: E402
from edgekit.errors import ConversionError, IncompatibleError, RuntimeUnavailableError  # noqa: E402
from edgekit.profiles import find_profile  # noqa: E402

ON_MAC = sys.platform == "darwin"


def _kernel_weights(model_path: Path) -> int:
    """Conv and dense kernel elements of the Keras model (what int8 weight quantization covers)."""
    import keras

    model = keras.models.load_model(model_path, compile=False)
    return sum(int(np.prod(w.shape)) for w in model.weights if len(w.shape) >= 2)


@pytest.fixture(scope="module")
def keras_source(digits, tmp_path_factory: pytest.TempPathFactory) -> SourceModel:
    return load_source(digits["model"], tmp_path_factory.mktemp("coreml-src"))


@pytest.fixture(scope="module")
def built(digits, keras_source: SourceModel, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The iphone-15-pro package and the float baseline, converted once, with their inspected facts."""
    conv = CoreMLConverter()
    profile = find_profile("iphone-15-pro")
    out = tmp_path_factory.mktemp("coreml-out")
    calib = np.load(digits["calib"])["x"]
    recipe = conv.recipes(profile, len(calib), 200)[-1]  # W8A16 is last on every host
    path = conv.convert(keras_source, profile, recipe, calib, out)
    float_path = conv.convert_float(keras_source, out)
    return {"path": path, "float": float_path, "profile": profile, "conv": conv,
            "facts": conv.inspect(path, profile), "float_facts": conv.inspect(float_path, profile)}


def _metrics(facts: ModelFacts) -> dict:
    return dict(facts.metrics)


def _spec(path: Path):
    import coremltools as ct

    return ct.models.MLModel(str(path), skip_model_load=True).get_spec()


def test_keras_model_becomes_an_ios17_ml_program(built) -> None:
    import coremltools as ct

    path = built["path"]
    assert path.name == "model.mlpackage" and path.is_dir()
    assert (path / "Manifest.json").is_file()
    spec = _spec(path)
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion == ct.target.iOS17.value  # the profile's minimum_deployment_target
    assert spec.mlProgram.functions["main"].opset == "CoreML7"
    assert spec.description.metadata.userDefined["com.edgekit.recipe"] == W8A16.name


def test_int8_weights_cover_every_conv_and_dense_kernel(built, digits) -> None:
    m = _metrics(built["facts"])
    assert m["int8_weight_tensors"].value == 3 and m["int8_weight_tensors"].status == "measured"
    assert "constexpr_affine_dequantize" in m["int8_weight_tensors"].note
    assert m["int8_weight_bytes"].value == _kernel_weights(digits["model"])  # 3x3x1x8 + 288x32 + 32x10
    # Biases and per-channel scales stay float16: 2 bytes each, 50 + 50 of them.
    assert m["float_weight_bytes"].value == 200
    float_m = _metrics(built["float_facts"])
    assert float_m["int8_weight_tensors"].value == 0
    assert float_m["float_weight_bytes"].value == 4 * (_kernel_weights(digits["model"]) + 50)  # FLOAT32 baseline


def test_quantized_package_is_smaller_than_the_float_baseline(built) -> None:
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())  # noqa: E731
    weights = lambda p: (p / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size  # noqa: E731
    assert weights(built["path"]) < 0.3 * weights(built["float"])
    assert size(built["path"]) < size(built["float"])


def test_io_and_ops_come_from_the_spec(built) -> None:
    facts = built["facts"]
    (inp,), (out,) = facts.inputs, facts.outputs
    assert (inp.name, inp.shape, inp.dtype, inp.quantization) == ("input_layer", (1, 8, 8, 1), "float32", None)
    assert (out.shape, out.dtype) == ((1, 10), "float32")
    assert "const" not in facts.ops
    assert {"conv", "linear", "softmax", "constexpr_affine_dequantize"} <= set(facts.ops)
    assert facts.ops.index("conv") < facts.ops.index("linear") < facts.ops.index("softmax")
    # float32 input 256 B; float16 cast 128, transpose 128, conv/transpose/relu/reshape 4 x 576, linear/relu 2 x 64,
    # linear/softmax 2 x 20; float32 output cast 40.
    assert facts.activation_bytes == 3024
    assert built["float_facts"].ops == ("transpose", "conv", "transpose", "relu", "reshape", "linear", "relu", "linear", "softmax")


def test_notes_say_what_this_host_verified(built) -> None:
    facts = built["facts"]
    text = "\n".join(facts.notes)
    assert "loads with coremltools" in text and "weights int8: 3 tensors, 9,608 B" in text
    on_list = next(n for n in facts.notes if n.startswith("ops on the ane list"))
    n_on = sum(op in built["profile"].accelerators_for("coreml")[0].supported_ops for op in facts.ops)
    assert f"{n_on}/{len(facts.ops)}" in on_list
    numerics = _metrics(facts).get("numerics")
    if ON_MAC:
        assert numerics is None
    else:
        assert numerics.status == "not_measurable" and numerics.value is None
        assert "unverified on this host" in text


def test_inspect_rejects_a_package_missing_its_weights(built, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "model.mlpackage"
    shutil.copytree(built["path"], broken)
    weights = broken / "Data/com.apple.CoreML/weights/weight.bin"
    weights.write_bytes(weights.read_bytes()[:64])  # the blob file header only
    with pytest.raises(ConversionError, match="package lacks"):
        CoreMLConverter().inspect(broken, built["profile"])


def test_saved_model_source(digits, tmp_path: Path) -> None:
    conv = CoreMLConverter()
    profile = find_profile("iphone-15-pro")
    source = load_source(digits["saved_model"], tmp_path)
    assert len(conv.check(source, profile)) == (0 if ON_MAC else 1)  # the W8A16 note off macOS
    path = conv.convert(source, profile, W8A16, np.load(digits["calib"])["x"][:8], tmp_path)
    facts = conv.inspect(path, profile)
    assert facts.inputs[0].shape == (1, 8, 8, 1)
    assert _metrics(facts)["int8_weight_tensors"].value == 3
    assert {"conv", "linear"} <= set(facts.ops)


def test_ios18_target_uses_blockwise_int8_ops(keras_source: SourceModel, digits, tmp_path: Path) -> None:
    import coremltools as ct

    base = find_profile("iphone-15-pro")
    coreml = base.formats.coreml.model_copy(update={"minimum_deployment_target": "iOS18"})
    profile = base.model_copy(update={"formats": base.formats.model_copy(update={"coreml": coreml})})
    path = CoreMLConverter().convert(keras_source, profile, W8A16, np.load(digits["calib"])["x"][:8], tmp_path)
    assert _spec(path).specificationVersion == ct.target.iOS18.value
    facts = CoreMLConverter().inspect(path, profile)
    m = _metrics(facts)
    assert "constexpr_blockwise_shift_scale" in facts.ops and "constexpr_affine_dequantize" not in facts.ops
    assert (m["int8_weight_tensors"].value, m["int8_weight_bytes"].value) == (3, _kernel_weights(digits["model"]))


def test_runs_here_only_on_macos() -> None:
    ok, why = CoreMLConverter().runs_here()
    if ON_MAC:
        assert (ok, why) == (True, "")
    else:
        assert (ok, why) == (False, "Core ML models predict only on macOS; numerics unverified on this host")


def test_recipes_by_host() -> None:
    recipes = CoreMLConverter().recipes(find_profile("iphone-15-pro"), 200, 200)
    assert recipes == ([W8A8, W8A16] if ON_MAC else [W8A16])
    assert W8A16.name == "w8-per-channel" and (W8A16.weights, W8A16.activations) == ("int8", "float16")


@pytest.mark.skipif(ON_MAC, reason="activation calibration runs on macOS")
def test_w8a8_needs_macos(keras_source: SourceModel, digits, tmp_path: Path) -> None:
    with pytest.raises(RuntimeUnavailableError, match="only on macOS"):
        CoreMLConverter().convert(keras_source, find_profile("iphone-15-pro"), W8A8, np.load(digits["calib"])["x"][:4], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_linux_check_warns_about_w8a16(keras_source: SourceModel) -> None:
    warnings = CoreMLConverter().check(keras_source, find_profile("iphone-15-pro"))
    assert any("W8A16" in w for w in warnings) != ON_MAC


def test_profile_without_coreml_is_incompatible(keras_source: SourceModel) -> None:
    with pytest.raises(IncompatibleError, match="does not take Core ML") as e:
        CoreMLConverter().check(keras_source, find_profile("raspberry-pi-5"))
    assert "--format" in e.value.hint


def test_missing_coremltools(keras_source: SourceModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "coremltools", None)  # what `import coremltools` meets when it is not installed
    with pytest.raises(RuntimeUnavailableError, match="coremltools is not installed") as e:
        CoreMLConverter().check(keras_source, find_profile("iphone-15-pro"))
    assert e.value.hint == "Install the conversion tools with: pip install 'edgekit[convert]'"


def test_model_over_the_memory_budget(keras_source: SourceModel) -> None:
    from dataclasses import replace

    big = replace(keras_source, param_count=2_000_000_000)
    with pytest.raises(IncompatibleError, match="model budget"):
        CoreMLConverter().check(big, find_profile("iphone-15-pro"))


# --- through the pipeline and the CLI -------------------------------------------------------


@pytest.fixture(scope="module")
def coreml_run(digits, tmp_path_factory):
    from converters.pipeline import ConvertOptions, run_convert

    out = tmp_path_factory.mktemp("coreml-bundles")
    opts = ConvertOptions(model=digits["model"], profiles=("iphone-15-pro",), formats=("coreml",), calibration=digits["calib"],
                          eval=digits["eval"], out=out, name="digits", latency_runs=3)
    return run_convert(opts)


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS Core ML numerics are measured like the other formats")
def test_pipeline_marks_numerics_unverified_on_linux(coreml_run) -> None:
    from edgekit.bundle import verify_bundle

    (r,) = coreml_run.results
    m = r.manifest
    assert m.file == "digits.mlpackage" and (r.bundle_dir / m.file).is_dir()
    for key in ("int8_accuracy", "accuracy_drop", "agreement", "host_latency_ms_p50"):
        assert m.metrics[key].status == "not_measurable" and "macOS" in m.metrics[key].note
    assert m.metrics["size_ratio"].status == "measured" and m.metrics["int8_weight_bytes"].value > 0
    assert any("unverified" in v for v in m.verification)
    assert m.quantization.activations == "float16" and m.quantization.attempts[0].chosen
    assert verify_bundle(r.bundle_dir).ok  # the signature covers the whole package directory


@pytest.mark.skipif(sys.platform == "darwin", reason="Linux-only behaviour")
def test_runtime_load_on_linux_says_why(coreml_run, run_cli) -> None:
    from edgekit import runtime
    from edgekit.errors import RuntimeUnavailableError

    with pytest.raises(RuntimeUnavailableError, match="only run on macOS"):
        runtime.load(coreml_run.results[0].bundle_dir)
    code, _, err = run_cli("bench", coreml_run.results[0].bundle_dir)
    assert code == 6 and "macOS" in err and "Hint:" in err and "Traceback" not in err


def test_cli_without_coremltools(digits, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "coremltools", None)
    out = tmp_path / "out"
    code, _, err = run_cli("convert", digits["model"], "--profile", "iphone-15-pro", "--format", "coreml", "--calibration", digits["calib"],
                           "--out", out)
    assert code == 6 and "coremltools is not installed" in err and "edgekit[convert]" in err and "Traceback" not in err
    assert not out.exists()


def test_the_same_model_converts_to_the_same_bytes(built, keras_source: SourceModel, digits, tmp_path: Path) -> None:
    """coremltools writes random uuid4 item ids into Manifest.json; the converter replaces them with ids
    derived from each item's path and content, so a second conversion has the same sha256."""
    import json

    from edgekit.bundle import sha256_file

    conv, profile = built["conv"], built["profile"]
    calib = np.load(digits["calib"])["x"]
    recipe = conv.recipes(profile, len(calib), 200)[-1]
    again = conv.convert(keras_source, profile, recipe, calib, tmp_path)
    assert sha256_file(again) == sha256_file(built["path"])
    doc = json.loads((again / "Manifest.json").read_text())
    assert doc["rootModelIdentifier"] in doc["itemInfoEntries"]
    assert {e["name"] for e in doc["itemInfoEntries"].values()} == {"model.mlmodel", "weights"}
    import coremltools as ct

    ct.models.MLModel(str(again), skip_model_load=True)  # coremltools still reads the package


def test_stable_ids_follow_the_content(built, tmp_path: Path) -> None:
    import shutil

    from converters.coreml import stable_package_ids

    a, b = tmp_path / "a.mlpackage", tmp_path / "b.mlpackage"
    shutil.copytree(built["path"], a)
    shutil.copytree(built["float"], b)
    stable_package_ids(a)
    stable_package_ids(b)
    ids_a = set(__import__("json").loads((a / "Manifest.json").read_text())["itemInfoEntries"])
    ids_b = set(__import__("json").loads((b / "Manifest.json").read_text())["itemInfoEntries"])
    assert not ids_a & ids_b  # different weights, different ids
