"""One quantization peer, run as its own process by ``bench/quantization_peers.py``.

    <peer venv>/bin/python bench/peers_worker.py SPEC.json

SPEC.json: ``{"peer": ..., "float": <float model>, "calib": <calib .npz>, "out": <int8 model path>,
"options": {...}}``. The worker imports only numpy and the peer's own packages (it runs inside
the peer's venv, see scripts/peers-venv.sh), quantizes the float model with the calibration
images, writes the model to ``out`` and ``out + ".json"``: the peer's seconds for import and for
quantizing, its package versions and what it ran (recipe text). Evaluation happens elsewhere,
with one evaluator for every peer.

Peers:

- ``litert-plain`` (project venv): ``TFLiteConverter.from_keras_model``, ``Optimize.DEFAULT``,
  representative dataset of the calibration images one at a time, ``TFLITE_BUILTINS_INT8``, int8
  input and output. Starts from the ``.keras`` model.
- ``litert-float`` (project venv): ``TFLiteConverter.from_keras_model(model).convert()``, the float
  ``.tflite`` a user with a ``.keras`` makes before running ``aiq`` (the benchmark's ``aiq-keras`` side).
- ``aiq`` (Google ``ai-edge-quantizer``): ``recipe.static_wi8_ai8()`` (min-max, int8 weights and
  activations) on the float ``.tflite``, calibrated with the same images; float I/O as it leaves it.
- ``ort-plain`` (project venv): ``quant_pre_process`` then ``quantize_static`` QDQ, per-channel,
  int8 weights, uint8 activations (what ORT documents for x86), MinMax, on the float ``.onnx``.
- ``nncf``: ``nncf.quantize`` with its defaults (preset performance, fast bias correction) and
  ``subset_size`` = every calibration image.
- ``aimet``: AIMET ONNX: cross-layer equalization (``equalize_model``), ``QuantizationSimModel``
  (int8 weights and activations, min-max), AdaRound on the calibration images in batches of 32
  (``options.adaround_iterations``; 0 skips it), ``compute_encodings``, exported with
  ``to_onnx_qdq(prequantize_constants=True)``.
- ``inc``: Intel Neural Compressor for ONNX Runtime (``onnx-neural-compressor``):
  ``quantize`` with ``StaticQuantConfig`` defaults (QOperator, U8S8, per-tensor, MinMax)
  except ``calibration_sampling_size`` = every calibration image.
- ``olive`` (Microsoft Olive): one ``OnnxStaticQuantization`` pass with its defaults on the float
  ``.onnx``, the calibration images through a registered dataset (``olive.workflows.run``).
"""

from __future__ import annotations

import json
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np


def _versions(*dists: str) -> dict[str, str]:
    out = {}
    for d in dists:
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            pass
    return out


class _Reader:
    """An ONNX Runtime style CalibrationDataReader: one image per call."""

    def __init__(self, name: str, x: np.ndarray) -> None:
        self.name, self.x, self.i = name, x, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {self.name: self.x[self.i - 1 : self.i]}

    def rewind(self) -> None:
        self.i = 0

    def __len__(self) -> int:
        return len(self.x)


def _onnx_input_name(path: str) -> str:
    import onnx

    m = onnx.load(path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return next(i.name for i in m.graph.input if i.name not in inits)


def litert_plain(spec: dict, calib: np.ndarray) -> tuple[dict, str]:
    t0 = time.perf_counter()
    import keras
    import tensorflow as tf

    t1 = time.perf_counter()
    model = keras.models.load_model(spec["float"])

    def representative():
        for i in range(len(calib)):
            yield [calib[i : i + 1]]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    Path(spec["out"]).write_bytes(conv.convert())
    return {"import_s": t1 - t0, "versions": _versions("tensorflow-cpu", "tensorflow", "keras")}, \
        "TFLiteConverter.from_keras_model, Optimize.DEFAULT, TFLITE_BUILTINS_INT8, int8 I/O"


def litert_float(spec: dict, calib: np.ndarray) -> tuple[dict, str]:
    t0 = time.perf_counter()
    import keras
    import tensorflow as tf

    t1 = time.perf_counter()
    model = keras.models.load_model(spec["float"])
    Path(spec["out"]).write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return {"import_s": t1 - t0, "versions": _versions("tensorflow-cpu", "tensorflow", "keras")}, \
        "TFLiteConverter.from_keras_model, float32"


def aiq(spec: dict, calib: np.ndarray) -> tuple[dict, str]:
    t0 = time.perf_counter()
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe

    t1 = time.perf_counter()
    interp = Interpreter(model_path=spec["float"])
    sigs = interp.get_signature_list()
    key = next(iter(sigs))
    name = sigs[key]["inputs"][0]
    qt = quantizer.Quantizer(spec["float"])
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    result = qt.calibrate({key: [{name: calib[i : i + 1]} for i in range(len(calib))]})
    qt.quantize(result, enable_progress_report=False).export_model(spec["out"], overwrite=True)
    return {"import_s": t1 - t0, "versions": _versions("ai-edge-quantizer", "ai-edge-litert")}, \
        "ai_edge_quantizer recipe.static_wi8_ai8() (min-max, int8 weights + activations)"


def ort_plain(spec: dict, calib: np.ndarray) -> tuple[dict, str]:
    t0 = time.perf_counter()
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    t1 = time.perf_counter()
    pre = spec["out"] + ".pre.onnx"
    quant_pre_process(spec["float"], pre)
    quantize_static(pre, spec["out"], _Reader(_onnx_input_name(pre), calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    Path(pre).unlink()
    return {"import_s": t1 - t0, "versions": _versions("onnxruntime", "onnx")}, \
        "quant_pre_process + quantize_static QDQ per-channel U8S8 MinMax"


def nncf_peer(spec: dict, calib: np.ndarray) -> tuple[dict, str]:
    t0 = time.perf_counter()
    import nncf
    import onnx

    t1 = time.perf_counter()
    model = onnx.load(spec["float"])
    name = _onnx_input_name(spec["float"])
    ds = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))], lambda x: {name: x})
    q = nncf.quantize(model, ds, subset_size=len(calib))
    onnx.save(q, spec["out"])
    return {"import_s": t1 - t0, "versions": _versions("nncf", "onnx", "onnxruntime")}, \
        f"nncf.quantize defaults (preset performance, fast bias correction), subset_size={len(calib)}"


def aimet(spec: dict, calib: np.ndarray) -> tuple[dict, str]:
    t0 = time.perf_counter()
    import onnx
    from aimet_onnx import QuantizationSimModel, apply_adaround
    from aimet_onnx.cross_layer_equalization import equalize_model

    t1 = time.perf_counter()
    iterations = int(spec.get("options", {}).get("adaround_iterations", 0))
    model = onnx.load(spec["float"])
    name = _onnx_input_name(spec["float"])
    inputs = [{name: calib[i : i + 32]} for i in range(0, len(calib), 32)]  # AIMET's batches (AdaRound samples 32 per step)
    equalize_model(model)
    sim = QuantizationSimModel(model, param_type="int8", activation_type="int8", quant_scheme="min_max",
                               providers=["CPUExecutionProvider"])
    what = "AIMET equalize_model (CLE), QuantizationSimModel int8/int8 min-max"
    if iterations:
        apply_adaround(sim, inputs, num_iterations=iterations)
        what += f", AdaRound {iterations} iterations per layer"
    sim.compute_encodings(inputs)
    onnx.save(sim.to_onnx_qdq(prequantize_constants=True), spec["out"])
    return {"import_s": t1 - t0, "versions": _versions("aimet-onnx", "torch", "onnx", "onnxruntime")}, what + ", to_onnx_qdq"


def inc(spec: dict, calib: np.ndarray) -> tuple[dict, str]:
    t0 = time.perf_counter()
    from onnx_neural_compressor import data_reader
    from onnx_neural_compressor.quantization import config, quantize

    t1 = time.perf_counter()
    name = _onnx_input_name(spec["float"])

    class Reader(data_reader.CalibrationDataReader):
        def __init__(self) -> None:
            self.inner = _Reader(name, calib)

        def get_next(self):
            return self.inner.get_next()

        def rewind(self) -> None:
            self.inner.rewind()

    cfg = config.StaticQuantConfig(Reader(), calibration_sampling_size=len(calib))
    quantize(spec["float"], spec["out"], cfg)
    return {"import_s": t1 - t0, "versions": _versions("onnx-neural-compressor", "onnxruntime", "onnx")}, \
        f"onnx_neural_compressor quantize, StaticQuantConfig defaults (QOperator U8S8 per-tensor MinMax), {len(calib)} samples"


OLIVE_USER_SCRIPT = '''
import numpy as np
import torch
from olive.data.registry import Registry


class NpzImages(torch.utils.data.Dataset):
    def __init__(self, path, input_name):
        self.x = np.load(path)["x"].astype(np.float32)
        self.input_name = input_name

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {self.input_name: torch.from_numpy(self.x[i])}, 0


@Registry.register_dataset()
def npz_images(path, input_name):
    return NpzImages(path, input_name)
'''


def olive(spec: dict, calib: np.ndarray) -> tuple[dict, str]:
    import shutil

    t0 = time.perf_counter()
    from olive.workflows import run as olive_run

    t1 = time.perf_counter()
    out = Path(spec["out"])
    work = out.parent / "olive-work"
    work.mkdir(exist_ok=True)
    script = work / "olive_user_script.py"
    script.write_text(OLIVE_USER_SCRIPT)
    name = _onnx_input_name(spec["float"])
    config = {
        "input_model": {"type": "ONNXModel", "model_path": spec["float"]},
        "systems": {"local_system": {"type": "LocalSystem",
                                     "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "data_configs": [{"name": "calib", "user_script": str(script),
                          "load_dataset_config": {"type": "npz_images", "params": {"path": spec["calib"], "input_name": name}}}],
        "passes": {"quantization": {"type": "OnnxStaticQuantization", "data_config": "calib"}},
        "host": "local_system", "target": "local_system",
        "output_dir": str(work / "output"), "cache_dir": str(work / "cache"), "log_severity_level": 3,
    }
    olive_run(config)
    produced = work / "output" / "model.onnx"
    shutil.copyfile(produced, out)
    for extra in produced.parent.glob("model.onnx.*"):  # external data, renamed with the model
        shutil.copyfile(extra, out.parent / extra.name.replace("model.onnx", out.name))
    shutil.rmtree(work, ignore_errors=True)
    return {"import_s": t1 - t0, "versions": _versions("olive-ai", "onnxruntime", "onnx")}, \
        "olive.workflows.run, one OnnxStaticQuantization pass with its defaults"


PEERS = {"litert-plain": litert_plain, "litert-float": litert_float, "aiq": aiq, "ort-plain": ort_plain, "nncf": nncf_peer, "aimet": aimet, "inc": inc, "olive": olive}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    calib = np.load(spec["calib"])["x"].astype(np.float32)
    t0 = time.perf_counter()
    info, what = PEERS[spec["peer"]](spec, calib)
    total = time.perf_counter() - t0
    Path(spec["out"] + ".json").write_text(json.dumps({**info, "quantize_s": total - info["import_s"], "recipe": what}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
