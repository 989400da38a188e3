"""TFLite for multi-input / multi-output Keras models: every tensor matched by name, through the SavedModel export
(plain recipes) and the batch-1 clone (the recipes that transform the Keras model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters.dataset import load_dataset
from converters.source import load_source
from converters.tflite import TFLiteConverter, _batch1_clone
from edgekit.profiles import find_profile


def _signature_run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner()
    return {k: np.asarray(v) for k, v in runner(**feeds).items()}


def _first(calib: Path, source) -> dict[str, np.ndarray]:
    data = load_dataset(calib, role="calibration", inputs=source.inputs).x
    return {k: v[:1] for k, v in data.items()}


@pytest.mark.parametrize("fixture", ["detector_model", "stateful_model"])
def test_float_tflite_matches_keras_by_output_name(fixture: str, request, tmp_path: Path) -> None:
    files = request.getfixturevalue(fixture)
    source = load_source(files["model"], tmp_path)
    assert len(source.outputs) == 2
    path = TFLiteConverter().convert_float(source, tmp_path)
    feeds = _first(files["calib"], source)
    got = _signature_run(path, feeds)
    want = source.run(feeds)
    assert set(got) == set(want) == {"output_0", "output_1"}
    for name in want:  # by name: LiteRT's output order is not the source's
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recipe_name", ["int8-per-channel", "int8-cle-bias-corrected"])  # the SavedModel export; the clone
def test_int8_calibrates_each_input_by_name(stateful_model, recipe_name: str, tmp_path: Path) -> None:
    """A list of calibration arrays would be fed in the TFLite graph's input order (state, sr, audio here)."""
    from ai_edge_litert.interpreter import Interpreter

    source = load_source(stateful_model["model"], tmp_path)
    data = load_dataset(stateful_model["calib"], role="calibration", inputs=source.inputs)
    conv = TFLiteConverter()
    prof = find_profile("raspberry-pi-5")
    recipe = next(r for r in conv.recipes(prof, len(data), 500) if r.name == recipe_name)
    path = conv.convert(source, prof, recipe, data.x, tmp_path)
    interp = Interpreter(model_path=str(path))
    sig = interp.get_signature_runner().get_input_details()
    assert sig["sr"]["dtype"] == np.int64 and not sig["sr"]["quantization"][0]  # the rate is never quantized
    audio_scale = sig["audio"]["quantization"][0]
    audio_range = float(data.x["audio"].max() - data.x["audio"].min())
    assert audio_scale == pytest.approx(audio_range / 255, rel=0.05)  # audio's own range, not state's or the rate's


@pytest.mark.parametrize("fixture", ["detector_model", "stateful_model"])
def test_batch1_clone_keeps_every_input_name_dtype_and_output(fixture: str, request, tmp_path: Path) -> None:
    files = request.getfixturevalue(fixture)
    source = load_source(files["model"], tmp_path)
    clone = _batch1_clone(source)
    assert clone is not None
    assert [(t.name, tuple(t.shape), str(t.dtype)) for t in clone.inputs] == [(s.name, s.shape, s.dtype) for s in source.inputs]
    feeds = _first(files["calib"], source)
    got = clone([feeds[n] for n in source.input_names] if len(source.inputs) > 1 else feeds[source.input_names[0]])
    want = source.run(feeds)
    for name, out in zip(source.output_names, got):  # model.outputs order: the order the source's output_i names follow
        np.testing.assert_allclose(np.asarray(out), want[name], rtol=1e-5, atol=1e-6)
