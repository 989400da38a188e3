"""One TFLite conversion in a fresh process, so that TensorFlow's converter gives its memory back.

TensorFlow's converter keeps 150-300 MiB of every conversion in the process that ran it (the MLIR
context, the calibrator, traced functions; ``malloc_trim`` returns none of it). On EfficientNetB0
a whole two-profile run climbed from 1.4 GiB after the float export to 4.4 GiB by its last recipe.
So :class:`converters.tflite.TFLiteConverter` runs each conversion of a model over
``ISOLATE_MIN_PARAMS`` weights here, in a child that exits when it is done (docs/benchmarks.md):

    python -m converters.tflite_child JOB.pickle

``JOB.pickle`` is written by the parent into its own staging directory (never from user input):
the source's specs, the SavedModel export the parent already made, a ``.keras`` copy of the source
(recipes that transform the Keras model only), the recipe, the calibration ``.npz`` and the output
directory. The child writes ``result.json`` beside the job: the model's path, or the
ConversionError's message and hint, or ``fallback`` (the source cannot be rebuilt here, so the
parent converts in its own process).
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

__all__ = ["main"]


def _source(job: dict):
    from converters.source import SourceModel, import_tensorflow, keras_source

    saved = Path(job["saved_model_dir"]) if job["saved_model_dir"] else None
    if job["keras"] is not None:  # a transform recipe: the Keras model itself
        import keras

        tf = import_tensorflow()
        model = keras.models.load_model(job["keras"], compile=False)
        src = keras_source(model, Path(job["path"]), Path(job["workdir"]), tf, job["sha256"])
        if src.inputs != job["inputs"] or src.outputs != job["outputs"]:
            return None
    else:
        src = SourceModel(path=Path(job["path"]), kind=job["kind"], sha256=job["sha256"], inputs=job["inputs"],
                          outputs=job["outputs"], param_count=job["param_count"], workdir=Path(job["workdir"]),
                          _export=lambda: saved)
    if saved is not None:
        src.cache["saved_model_dir"] = saved
    return src


def main(argv: list[str]) -> int:
    import numpy as np

    from converters.tflite import TFLiteConverter
    from edgekit.errors import ConversionError

    job_path = Path(argv[0])
    job = pickle.loads(job_path.read_bytes())  # our own file, written by the parent in its staging directory
    result = job_path.parent / "result.json"
    try:
        src = _source(job)
    except Exception as e:  # a model Keras saves but cannot load back (custom layers): the parent converts it itself
        result.write_text(json.dumps({"fallback": f"{type(e).__name__}: {str(e)[:200]}"}))
        return 0
    if src is None:
        result.write_text(json.dumps({"fallback": "the reloaded model's inputs or outputs differ"}))
        return 0
    out = Path(job["out"])
    conv = TFLiteConverter()
    try:
        if job["recipe"] is None:
            path = conv.convert_float_here(src, out)
        else:
            with np.load(job["calibration"]) as z:
                calibration = {k: z[k] for k in z.files}
            path = conv.convert_here(src, job["profile"], job["recipe"], calibration, out)
    except ConversionError as e:
        result.write_text(json.dumps({"error": e.message, "hint": e.hint}))
        return 0
    result.write_text(json.dumps({"path": str(path)}))
    return 0


if __name__ == "__main__":
    rc = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    import os

    os._exit(rc)  # skip TensorFlow's interpreter teardown (seconds, and nothing to keep)
