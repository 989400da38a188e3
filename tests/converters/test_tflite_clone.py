"""The batch-1 Keras clone for multi-input / multi-output models: no SavedModel export, every tensor matched by name."""

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
def test_float_tflite_from_the_clone_matches_keras_by_output_name(fixture: str, request, tmp_path: Path) -> None:
    files = request.getfixturevalue(fixture)
    source = load_source(files["model"], tmp_path)
    assert len(source.outputs) == 2
    clone = _batch1_clone(source)
    assert clone is not None and [t.name for t in clone.inputs] == list(source.input_names)
    path = TFLiteConverter().convert_float(source, tmp_path)
    assert "saved_model_dir" not in source.cache  # the clone, not the SavedModel export, was converted
    feeds = _first(files["calib"], source)
    got = _signature_run(path, feeds)
    want = source.run(feeds)
    assert set(got) == set(want) == {"output_0", "output_1"}
    for name in want:  # by name: LiteRT's output order is not the source's
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_int8_from_the_clone_calibrates_each_input_by_name(stateful_model, tmp_path: Path) -> None:
    """A list of calibration arrays would be fed in the TFLite graph's input order (state, sr, audio here)."""
    from ai_edge_litert.interpreter import Interpreter

    source = load_source(stateful_model["model"], tmp_path)
    data = load_dataset(stateful_model["calib"], role="calibration", inputs=source.inputs)
    conv = TFLiteConverter()
    prof = find_profile("raspberry-pi-5")
    recipe = next(r for r in conv.recipes(prof, len(data), 500) if r.name == "int8-per-channel")
    path = conv.convert(source, prof, recipe, data.x, tmp_path)
    assert "saved_model_dir" not in source.cache
    interp = Interpreter(model_path=str(path))
    sig = interp.get_signature_runner().get_input_details()
    assert sig["sr"]["dtype"] == np.int64 and not sig["sr"]["quantization"][0]  # the rate is never quantized
    audio_scale = sig["audio"]["quantization"][0]
    audio_range = float(data.x["audio"].max() - data.x["audio"].min())
    assert audio_scale == pytest.approx(audio_range / 255, rel=0.05)  # audio's own range, not state's or the rate's
