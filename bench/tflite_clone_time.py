"""Wall time of edgekit's TFLite conversion of Keras models: the batch-1 clone vs the static SavedModel export.

Two routes to a TFLite converter for a Keras source: ``from_keras_model`` on a batch-1 clone, or
``from_saved_model`` on the run's one static batch-1 SavedModel export. Until 2d3daae single-I/O
models took the clone and multi-I/O models the export; 2d3daae gave every model the clone; 08d9313
gives every plain recipe the export (the clone only serves the CLE / bias-correction recipes). This
times, in one fresh process per run, the TFLite side of a run: loading the source, the float model
(the first conversion pays the export or the clone) and one full-int8 recipe (``int8-per-channel``).

Models: the test suite's detector head (boxes (N, 6, 64), objectness (N, 64)), MobileNetV3Small
(``weights=None``, 224x224, no top) with two heads (10 classes, 4 box numbers) and the plain
single-output MobileNetV3Small. Each route runs this script against a checkout of its commit:

    git worktree add /tmp/r-before 2d3daae~1; git worktree add /tmp/r-clone 2d3daae
    python bench/tflite_clone_time.py --build /tmp/tct                 # writes the models once
    PYTHONPATH=/tmp/r-before python bench/tflite_clone_time.py --time /tmp/tct/mnv3_two_heads
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable (after any PYTHONPATH checkout)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import time


def build(root: Path) -> None:
    import keras
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from convert_memory import _build_multi_io

    d = root / "detector"
    d.mkdir(parents=True, exist_ok=True)
    _build_multi_io("detector", d, 64)
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV3Small(weights=None, input_shape=(224, 224, 3), include_top=False, pooling="avg")
    model = keras.Model(base.input, [keras.layers.Dense(10, activation="softmax", name="cls")(base.output),
                                     keras.layers.Dense(4, name="box")(base.output)])
    single = keras.applications.MobileNetV3Small(weights=None, input_shape=(224, 224, 3))
    for name, m in (("mnv3_two_heads", model), ("mnv3", single)):
        d = root / name
        d.mkdir(exist_ok=True)
        m.save(d / f"{name}.keras")
        np.savez(d / "calib.npz", x=np.random.default_rng(0).uniform(0, 255, size=(32, 224, 224, 3)).astype(np.float32))


def time_one(d: Path) -> dict:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tempfile

    from converters.dataset import load_dataset
    from converters.source import load_source
    from converters.tflite import TFLiteConverter
    from edgekit.profiles import find_profile

    (model,) = d.glob("*.keras")
    out = Path(tempfile.mkdtemp(prefix="tct-"))
    t0 = time.perf_counter()
    source = load_source(model, out)
    data = load_dataset(d / "calib.npz", role="calibration", inputs=source.inputs)
    t1 = time.perf_counter()
    conv = TFLiteConverter()
    conv.convert_float(source, out)
    t2 = time.perf_counter()
    prof = find_profile("raspberry-pi-5")
    recipe = next(r for r in conv.recipes(prof, len(data), 500) if r.name == "int8-per-channel")
    (out / "q").mkdir()
    conv.convert(source, prof, recipe, data.x, out / "q")
    t3 = time.perf_counter()
    return {"model": d.name, "saved_model_export": "saved_model_dir" in source.cache, "load_s": t1 - t0, "float_s": t2 - t1,
            "int8_per_channel_s": t3 - t2, "loadavg": os.getloadavg()[0]}


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/tflite_clone_time.py")
    ap.add_argument("--build", type=Path)
    ap.add_argument("--time", type=Path)
    a = ap.parse_args()
    if a.build:
        build(a.build)
    if a.time:
        print("RESULT " + json.dumps(time_one(a.time)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
