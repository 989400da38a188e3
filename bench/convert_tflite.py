"""``edgekit convert`` vs a hand-written TFLiteConverter script, on the MNIST example.

Both sides run in this one process on the same model and the same 500 calibration images:
one untimed warm-up of each (TensorFlow's first conversion pays one-off tracing costs), then
``--reps`` timed repetitions, interleaved, the order reversed every other repetition; the
figures are medians.

edgekit: ``run_convert`` with profile raspberry-pi-5, format tflite, ``eval=eval.npz`` and the
CLI's defaults otherwise (latency_runs 50, calibration_samples 500), timed end to end. Its
phases are timed by wrappers installed on the functions the pipeline calls (exclusive time: a
call inside another wrapped call is charged to the inner one). "Evaluation" is reading
eval.npz, the float model on the 1,000 eval images, the int8 model on them and the
accuracy/agreement arithmetic; the headline ratio uses edgekit's total minus that.

plain: the script a user writes: ``np.load`` the calibration set, ``keras.models.load_model``,
``TFLiteConverter.from_keras_model``, ``Optimize.DEFAULT``, a representative dataset of the
calibration images one at a time, ``TFLITE_BUILTINS_INT8``, int8 input and output,
``convert()``, write the file. A second plain variant goes through ``model.export`` and
``from_saved_model`` for reference (edgekit's route for SavedModel sources and for Keras models
``clone_model`` cannot rebuild; other Keras models it converts from a batch-1 clone).

Accuracy: top-1 of each .tflite on the 1,000 eval images with a bare LiteRT Interpreter,
inputs quantized with the model's own input scale and zero point.

    python bench/convert_tflite.py [--reps 9]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import functools
import gc
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bench.harness import ROOT, OtherLoad, Ratio, host_facts, median, prepare_process, print_table, quiet, ratio_rows, write_result

NAME = "convert_tflite"
PROFILE = "raspberry-pi-5"
GOAL_TIME_RATIO = 1.2
EVALUATION_PHASES = ("read eval .npz", "float model on eval set", "int8 model on eval set", "accuracy/agreement")


@dataclass
class _Frame:
    opaque: bool
    children: float = 0.0


@dataclass
class PhaseClock:
    """Exclusive wall time per named phase of ``run_convert``, from wrappers on the functions it calls."""

    totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    _stack: list[_Frame] = field(default_factory=list)

    def reset(self) -> None:
        """Start a new run."""
        self.totals = defaultdict(float)

    def wrap(self, name: str | Callable[..., str], fn: Callable, *, opaque: bool = False) -> Callable:
        """``fn`` timed as phase ``name``; an opaque phase also takes the time of wrapped calls inside it."""
        clock = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if clock._stack and clock._stack[-1].opaque:
                return fn(*args, **kwargs)
            frame = _Frame(opaque)
            clock._stack.append(frame)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                clock._stack.pop()
                label = name(*args, **kwargs) if callable(name) else name
                clock.totals[label] += elapsed - frame.children
                if clock._stack:
                    clock._stack[-1].children += elapsed

        return timed


def install_phase_clock() -> tuple[PhaseClock, list[str]]:
    """Wrap the pipeline's steps where ``run_convert`` looks them up; also returns what was not found."""
    import converters.pipeline as pipeline
    import converters.tflite as tflite
    from converters.source import SourceModel
    from converters.tflite import TFLiteConverter
    from edgekit.runtime import TFLiteModel

    checks = "checks (inspect, op coverage, budgets)"
    targets: list[tuple[object, str, str | Callable[..., str], bool]] = [
        (pipeline, "find_profile", "profile lookup", False),
        (pipeline, "load_source", "keras load (load_source)", False),
        (tflite, "_batch1_clone", "batch-1 Keras clone (once per run)", False),
        (pipeline, "load_dataset", lambda *a, **k: "read eval .npz" if k.get("role") == "eval" else "read calibration .npz", False),
        (pipeline, "accuracy", "accuracy/agreement", False),
        (pipeline, "compare", "accuracy/agreement", False),
        (pipeline, "load_model_file", "LiteRT interpreter load", False),
        (pipeline, "latency_ms", "latency measurement", True),
        (pipeline, "op_coverage", checks, False),
        (pipeline, "write_bundle", "bundle writing + signing", False),
        (pipeline, "write_reports", "report + install", False),
        (pipeline, "_install", "report + install", False),
        (SourceModel, "predict", "float model on eval set", False),
        (TFLiteModel, "predict", "int8 model on eval set", False),
        (TFLiteConverter, "check", checks, False),
        (TFLiteConverter, "inspect", checks, False),
        (TFLiteConverter, "convert", "int8 conversion", False),
        (TFLiteConverter, "convert_float", "float conversion (size/latency baseline)", False),
    ]
    clock, missing = PhaseClock(), []
    for owner, attr, label, opaque in targets:
        if callable(getattr(owner, attr, None)):
            setattr(owner, attr, clock.wrap(label, getattr(owner, attr), opaque=opaque))
        else:  # the pipeline changed: its time shows up under "other"
            missing.append(f"{getattr(owner, '__name__', owner)}.{attr}")
    return clock, missing


def edgekit_convert(files: dict[str, Path], out: Path):
    """One ``run_convert`` as ``edgekit convert --profile raspberry-pi-5 --format tflite --eval`` runs it."""
    from converters.pipeline import ConvertOptions, run_convert

    opts = ConvertOptions(model=files["model"], profiles=(PROFILE,), calibration=files["calib"], out=out,
                          formats=("tflite",), eval=files["eval"])
    return run_convert(opts)


def plain_convert(model_path: Path, calib_path: Path, out: Path, *, via_saved_model: bool = False) -> Path:
    """The hand-written script: full-integer INT8 with TensorFlow's converter."""
    import keras
    import tensorflow as tf

    calib_x = np.load(calib_path)["x"]
    model = keras.models.load_model(model_path)
    if via_saved_model:
        model.export(str(out / "saved_model"), format="tf_saved_model")
        conv = tf.lite.TFLiteConverter.from_saved_model(str(out / "saved_model"))
    else:
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]

    def representative():
        for i in range(len(calib_x)):
            yield [calib_x[i : i + 1]]

    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    path = out / "model.tflite"
    path.write_bytes(conv.convert())
    return path


def litert_top1(model_path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent of an int8-I/O .tflite with a bare LiteRT Interpreter, batch 1."""
    from ai_edge_litert.interpreter import Interpreter

    with quiet():
        interp = Interpreter(model_path=str(model_path))
        interp.allocate_tensors()
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]
    scale, zero = inp["quantization"]
    info = np.iinfo(inp["dtype"])
    q = np.clip(np.rint(x / scale) + zero, info.min, info.max).astype(inp["dtype"])
    hits = 0
    for i in range(len(q)):
        interp.set_tensor(inp["index"], q[i : i + 1])
        interp.invoke()
        hits += int(interp.get_tensor(outp["index"])[0].argmax() == y[i])  # scale > 0: argmax is that of the dequantized output
    return 100.0 * hits / len(q)


def _fresh_session() -> None:
    """Between timed runs, for every side alike: drop Keras' graph state and garbage."""
    import keras

    keras.backend.clear_session()
    gc.collect()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9, help="Timed repetitions of each side (default 9).")
    args = ap.parse_args(argv)
    scratch = prepare_process()
    host = host_facts()

    from converters.source import import_tensorflow
    from examples.mnist.train import ensure_example

    files = ensure_example(ROOT / ".cache" / "examples" / "mnist")
    import_tensorflow()  # one TensorFlow for both sides, with edgekit's environment (oneDNN off)
    clock, not_instrumented = install_phase_clock()
    if not_instrumented:
        print(f"note: not instrumented (counted under 'other'): {', '.join(not_instrumented)}")
    ev = np.load(files["eval"])
    keep = scratch / "models"
    keep.mkdir()

    def run_edgekit(out: Path) -> tuple[float, dict[str, float], Path, object]:
        clock.reset()
        t0 = time.perf_counter()
        with quiet():
            report = edgekit_convert(files, out)
        total = time.perf_counter() - t0
        phases = dict(clock.totals)
        phases["other (pipeline glue)"] = total - sum(phases.values())
        bundle = report.results[0].bundle_dir
        return total, phases, next(bundle.glob("*.tflite")), report

    def run_plain(out: Path, via_saved_model: bool) -> tuple[float, Path]:
        t0 = time.perf_counter()
        with quiet():
            path = plain_convert(files["model"], files["calib"], out, via_saved_model=via_saved_model)
        return time.perf_counter() - t0, path

    sides = ("edgekit", "plain", "plain_saved_model")
    times: dict[str, list[float]] = {s: [] for s in sides}
    phase_runs: list[dict[str, float]] = []
    sizes: dict[str, set[int]] = {s: set() for s in sides}
    models: dict[str, Path] = {}
    report = None
    print(f"convert_tflite: 1 warm-up + {args.reps} timed runs of each side, interleaved ...", flush=True)
    with OtherLoad() as load:
        for rep in range(-1, args.reps):  # rep -1 is the warm-up
            order = sides if rep % 2 == 0 else tuple(reversed(sides))
            for side in order:
                _fresh_session()
                with tempfile.TemporaryDirectory(dir=scratch) as tmp:
                    out = Path(tmp)
                    if side == "edgekit":
                        t, phases, model, report = run_edgekit(out)
                    else:
                        t, model = run_plain(out, via_saved_model=side == "plain_saved_model")
                    sizes[side].add(model.stat().st_size)
                    if rep == -1:
                        models[side] = shutil.copy(model, keep / f"{side}.tflite")
                        continue
                    times[side].append(t)
                    if side == "edgekit":
                        phase_runs.append(phases)
    acc = {s: litert_top1(models[s], ev["x"], ev["y"]) for s in sides}
    med = {s: median(times[s]) for s in sides}
    phase_med = {p: median([r.get(p, 0.0) for r in phase_runs]) for p in dict.fromkeys(k for r in phase_runs for k in r)}
    eval_runs = [sum(r.get(p, 0.0) for p in EVALUATION_PHASES) for r in phase_runs]
    no_eval_runs = [t - e for t, e in zip(times["edgekit"], eval_runs)]
    med_eval, med_no_eval = median(eval_runs), median(no_eval_runs)
    manifest = report.results[0].manifest if report else None
    ratios = [
        Ratio("wall time edgekit (no evaluation) / plain", med_no_eval / med["plain"], GOAL_TIME_RATIO,
              "edgekit total minus the evaluation phases, over the from_keras_model script"),
        Ratio("wall time edgekit (all) / plain", med["edgekit"] / med["plain"], None, "evaluation included"),
        Ratio("wall time edgekit (no evaluation) / plain via SavedModel", med_no_eval / med["plain_saved_model"], None,
              "plain script through model.export + from_saved_model"),
    ]

    print_table(
        f"edgekit convert vs plain TFLiteConverter (MNIST CNN, {args.reps} reps, median s)",
        ["side", "wall s", "int8 top-1 (LiteRT)", ".tflite bytes"],
        [
            ["edgekit run_convert (all)", f"{med['edgekit']:.3f}", f"{acc['edgekit']:.2f}%", "/".join(map(str, sorted(sizes["edgekit"])))],
            ["  of which evaluation", f"{med_eval:.3f}", "", ""],
            ["  edgekit without evaluation", f"{med_no_eval:.3f}", "", ""],
            ["plain: from_keras_model", f"{med['plain']:.3f}", f"{acc['plain']:.2f}%", "/".join(map(str, sorted(sizes["plain"])))],
            ["plain: export + from_saved_model", f"{med['plain_saved_model']:.3f}", f"{acc['plain_saved_model']:.2f}%",
             "/".join(map(str, sorted(sizes["plain_saved_model"])))],
        ],
    )
    print_table("edgekit run_convert phases (median s, exclusive)", ["phase", "s", "evaluation?"],
                [[p, f"{v:.3f}", "yes" if p in EVALUATION_PHASES else ""] for p, v in sorted(phase_med.items(), key=lambda kv: -kv[1])])
    print_table("Ratios (lower is better)", ["ratio", "value", "goal", "met"], ratio_rows(ratios))
    print(load.describe())
    if report is not None:
        print(f"float Keras accuracy on the eval set: {report.float_accuracy:.2f}%; edgekit's own int8 figure: "
              f"{manifest.metrics['int8_accuracy'].value:.2f}% (recipe {manifest.quantization.recipe})")

    path = write_result(NAME, host, {
        "what": __doc__,
        "model": "examples/mnist CNN (.keras), 500 calibration images, 1,000 eval images",
        "profile": PROFILE,
        "reps": args.reps,
        "other_load_cores": load.cores,
        "seconds": {s: {"median": med[s], "runs": times[s]} for s in sides},
        "edgekit_evaluation_seconds": {"median": med_eval, "runs": eval_runs},
        "edgekit_without_evaluation_seconds": {"median": med_no_eval, "runs": no_eval_runs},
        "edgekit_phases_median_seconds": phase_med,
        "edgekit_phases_runs": phase_runs,
        "not_instrumented": not_instrumented,
        "int8_top1_litert_percent": acc,
        "float_top1_percent": report.float_accuracy if report else None,
        "edgekit_manifest_int8_top1_percent": manifest.metrics["int8_accuracy"].value if manifest else None,
        "edgekit_recipe": manifest.quantization.recipe if manifest else None,
        "tflite_bytes": {s: sorted(v) for s, v in sizes.items()},
        "ratios": [r.to_dict() for r in ratios],
    })
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
