"""One TFLite conversion in a fresh process, so that TensorFlow's converter gives its memory back.

TensorFlow's converter keeps 150-300 MiB of every conversion in the process that ran it (the MLIR
context, the calibrator, traced functions; ``malloc_trim`` returns none of it). On EfficientNetB0
a whole two-profile run climbed from 1.4 GiB after the float export to 4.4 GiB by its last recipe.
So :class:`converters.tflite.TFLiteConverter` runs each conversion of a model over
``ISOLATE_MIN_PARAMS`` weights in a child that exits when it is done (docs/benchmarks.md).

The parent's side is :func:`run_in_child`; the child's is :func:`main`:

    python -m converters.tflite_child JOB.pickle

``JOB.pickle`` is written by the parent into its own staging directory (never from user input):
the source's specs, the SavedModel export the parent already made, a ``.keras`` copy of the source
(recipes that transform the Keras model only), the recipe, the calibration ``.npz``, the output
directory. The child writes ``result.json`` beside the job: the model's path,
or the ConversionError's message and hint, or ``fallback`` (the source cannot be rebuilt here, so
the parent converts in its own process).

The child ends with its parent: a Ctrl-C or SIGTERM reaches the parent, which kills the child;
a parent killed outright cannot, so the child asks for its end with the parent's
(:mod:`edgekit.childproc`).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from converters.base import Recipe
    from converters.source import Feeds, SourceModel
    from edgekit.profiles import HardwareProfile

__all__ = ["CHILD_BASE_BYTES", "ISOLATE_MIN_PARAMS", "isolated", "main", "process_bytes", "run_in_child"]

ISOLATE_MIN_PARAMS = 1_000_000
"""Sources with more weights convert each TFLite model in a child process. Smaller ones convert in the run's own
process: a child's TensorFlow import (2-4 s) would be most of a small model's conversion, and what it keeps is a
few MiB."""

CHILD_BASE_BYTES = 700e6  # peak RSS of `import tensorflow` + converters.tflite in a fresh process here (2026-12-02)


def isolated(source: SourceModel) -> bool:
    """Whether ``source``'s TFLite conversions run in child processes (``EDGEKIT_TFLITE_IN_PROCESS=1`` turns it off)."""
    return (source.param_count > ISOLATE_MIN_PARAMS and source.kind in ("keras", "saved_model")
            and source.cache.get("tflite_child") is not False and os.environ.get("EDGEKIT_TFLITE_IN_PROCESS") != "1")


def process_bytes(source: SourceModel) -> int:
    """What one child needs beside the run's own process.

    It imports TensorFlow and LiteRT (700 MB here) and loads the SavedModel (and, for the transform
    recipes, the Keras model): its weights about four times over, as float and in the converter's copies.
    """
    return int(CHILD_BASE_BYTES + source.param_count * 16)


def _keras_copy(source: SourceModel) -> str | None:
    """A .keras copy of the (possibly rewritten) Keras source for the children's transform recipes, saved once per run (None: it cannot be)."""
    from edgekit.nativelog import captured_output

    if "tflite_child_keras" not in source.cache:
        path: Path | None = source.workdir / "tflite-child-source.keras"
        try:
            with captured_output():
                source.keras_model.save(str(path))
        except Exception:  # a layer Keras cannot serialize: the transform recipes convert in this process
            path = None
        source.cache["tflite_child_keras"] = str(path) if path is not None else None
    return source.cache["tflite_child_keras"]


def run_in_child(source: SourceModel, profile: HardwareProfile | None, recipe: Recipe | None, calibration: Feeds | None, out: Path, *,
                 transforms: bool) -> Path | None:
    """Run one conversion (``recipe`` None: the float one) in a fresh process; None when the child cannot rebuild the source.

    ``transforms``: the recipe rewrites the Keras model (CLE, bias correction), so the child needs the model itself.
    """
    import shutil
    import subprocess
    import time

    import numpy as np

    from converters.pipeline import INTERRUPTED
    from edgekit.childproc import child_env
    from edgekit.errors import ConversionError

    keras_path = None
    if transforms:
        if source.keras_model is None:  # convert_here explains
            return None
        keras_path = _keras_copy(source)
        if keras_path is None:
            return None
    job_dir = out / ".tflite-child"
    job_dir.mkdir(exist_ok=True)
    calib_path = None
    if calibration is not None:
        calib_path = job_dir / "calibration.npz"
        np.savez(calib_path, **{k: np.asarray(v) for k, v in calibration.items()})
    job = {"path": str(source.path), "kind": source.kind, "sha256": source.sha256, "inputs": source.inputs, "outputs": source.outputs,
           "param_count": source.param_count, "workdir": str(source.workdir), "saved_model_dir": str(source.saved_model_dir),
           "keras": keras_path, "profile": profile, "recipe": recipe, "calibration": str(calib_path) if calib_path else None, "out": str(out)}
    (job_dir / "job.pickle").write_bytes(pickle.dumps(job))
    log = job_dir / "child.log"
    with open(log, "wb") as f:
        # Its own session: a Ctrl-C reaches this process, which ends the child below, and not the child mid-write.
        env = child_env(dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p)))
        proc = subprocess.Popen([sys.executable, "-m", "converters.tflite_child", str(job_dir / "job.pickle")], env=env,
                                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                if INTERRUPTED.is_set():
                    raise KeyboardInterrupt("interrupted")
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    what = recipe.name if recipe is not None else "float"
    result = job_dir / "result.json"
    if proc.returncode != 0 or not result.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise ConversionError(f"TFLite conversion ({what}) failed: its process ended with {why}{': ' + tail[0][:200] if tail else ''}",
                              "A signal 9 is usually the kernel's out-of-memory killer: lower --max-memory or use more RAM.")
    got = json.loads(result.read_text())
    if "fallback" in got:
        source.cache["tflite_child"] = False  # the children cannot rebuild this source: every conversion runs here
        return None
    if "error" in got:
        raise ConversionError(got["error"], got["hint"])
    shutil.rmtree(job_dir, ignore_errors=True)
    return Path(got["path"])


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
    """The child's side: run the job at ``argv[0]`` and write its ``result.json``."""
    from edgekit.childproc import end_with_parent

    end_with_parent()
    job_path = Path(argv[0])
    job = pickle.loads(job_path.read_bytes())  # our own file, written by the parent in its staging directory

    import numpy as np

    from converters.tflite import TFLiteConverter
    from edgekit.errors import ConversionError

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
    os._exit(rc)  # skip TensorFlow's interpreter teardown (seconds, and nothing to keep)
