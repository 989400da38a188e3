"""Peak memory and wall time of conversion, per recipe, for real-sized models: edgekit vs the plain tools.

Models (no downloads): Keras EfficientNetB0, MobileNetV3Small and ResNet50 with ``weights=None``
at 224x224, and the ``onnx`` wheel's IR-3 ResNet-50 (``light_resnet50.onnx``). Calibration: 32
seeded random images (the checks' numbers mean nothing on random weights; memory and time do).

Every measurement is one fresh child process, so TensorFlow's caches from one cannot inflate the
next. Two memory figures per row: the largest single process (the larger of the child's own
``ru_maxrss`` and that of any process it started, such as the tf2onnx export), and all of its
processes at once (their RSS summed, sampled every 50 ms: the conversion process stays alive while
its export child runs). The goal is judged on the larger of the two. Wall time is the child's.

- ``edgekit <recipe>``: one recipe through edgekit's converter (source load + the recipe's
  ``convert``), for raspberry-pi-5.
- ``plain tflite``: ``TFLiteConverter.from_keras_model`` + a representative dataset, full int8.
- ``plain ort``: ``quant_pre_process`` + ``quantize_static`` (QDQ, MinMax, per-channel), ONNX
  Runtime's defaults (every calibration sample's intermediate outputs held at once).
- ``edgekit convert``: the whole CLI run (both formats, every recipe it tries, the task inferred; an
  untrained classifier's int8 TFLite softmax rounds to 0, so that job fails its budget: still a memory figure).

    python bench/convert_memory.py [--models efficientnetb0,...] [--samples 32] [--skip-full] [--sides qdq-minmax-per-channel,keep1,...]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import resource
import subprocess
import time

from bench.harness import ROOT, Ratio, host_facts, prepare_process, print_table, ratio_rows, write_result

NAME = "convert_memory"
MODELS = ("efficientnetb0", "mobilenetv3small", "resnet50", "zoo-resnet50")
GOAL_MB = 4096  # issue 10: under 4 GB on any recipe for a model under 100 MB
PROFILE = "raspberry-pi-5"
FULL_PROFILES = ("raspberry-pi-5", "pixel-8")  # the "Done when" pair


def _build(name: str, scratch: Path, samples: int) -> tuple[Path, Path]:
    import numpy as np

    d = scratch / name
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    if name in ("detector", "stateful"):
        return _build_multi_io(name, d, samples)
    if name.startswith("zoo-"):
        import onnx

        model = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name[4:]}.onnx"
        x = rng.uniform(0, 1, size=(samples, 3, 224, 224)).astype(np.float32)
    else:
        import keras

        ctor = {"efficientnetb0": keras.applications.EfficientNetB0, "mobilenetv3small": keras.applications.MobileNetV3Small,
                "resnet50": keras.applications.ResNet50}[name]
        model = d / f"{name}.keras"
        keras.utils.set_random_seed(0)
        ctor(weights=None, input_shape=(224, 224, 3)).save(model)
        x = rng.uniform(0, 255, size=(samples, 224, 224, 3)).astype(np.float32)
    calib = d / "calib.npz"
    np.savez(calib, x=x)
    return model, calib


def _build_multi_io(name: str, d: Path, samples: int) -> tuple[Path, Path]:
    """The issue's multi-I/O shapes, small and seeded: a two-output detector head (boxes (N, 6, 64), objectness (N, 64))
    or a stateful cell with three inputs (audio, state, int64 sample rate) and two outputs."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(2)
    rng = np.random.default_rng(2)
    L = keras.layers
    if name == "detector":
        x = keras.Input((16, 16, 3), name="image")
        grid = L.Reshape((64, 16))(L.Conv2D(16, 3, padding="same", activation="relu")(L.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)))
        model = keras.Model(x, [L.Permute((2, 1))(L.Dense(6)(grid)), L.Reshape((64,))(L.Dense(1, activation="sigmoid")(grid))])
        arrays = {"x": rng.uniform(0, 1, size=(samples, 16, 16, 3)).astype(np.float32)}
    else:
        audio, state, sr = keras.Input((32,), name="audio"), keras.Input((16,), name="state"), keras.Input((1,), name="sr", dtype="int64")
        h = L.Concatenate()([L.Dense(16, activation="tanh")(audio), state, L.Rescaling(1 / 16000.0)(sr)])
        new_state = L.Dense(16, activation="tanh", name="new_state")(h)
        model = keras.Model([audio, state, sr], [L.Dense(1, activation="sigmoid", name="speech")(new_state), new_state])
        arrays = {"audio": rng.normal(scale=0.3, size=(samples, 32)).astype(np.float32),
                  "state": rng.uniform(-1, 1, size=(samples, 16)).astype(np.float32),
                  "sr": rng.choice([8000, 16000], size=(samples, 1)).astype(np.int64)}
    path = d / f"{name}.keras"
    model.save(path)
    np.savez(d / "calib.npz", **arrays)
    return path, d / "calib.npz"


# --- children ------------------------------------------------------------------------------------

def _child_edgekit_recipe(model: Path, calib: Path, fmt: str, recipe_name: str, out: Path) -> dict:
    from converters import get_converter
    from converters.dataset import load_dataset
    from converters.memory import MemoryPlan, default_max_memory_mb
    from converters.source import load_source
    from edgekit.profiles import find_profile

    prof = find_profile(PROFILE)
    source = load_source(model, out)
    source.cache["calibration_chunk"] = MemoryPlan(default_max_memory_mb()).chunk(source)
    data = load_dataset(calib, role="calibration", inputs=source.inputs)
    conv = get_converter(fmt)
    recipes = conv.recipes(prof, len(data), 500)
    recipe = next((r for r in recipes if r.name == recipe_name), None)
    if recipe is None:
        raise ValueError(f"no recipe {recipe_name} for {PROFILE}/{fmt}; there are {', '.join(r.name for r in recipes)}")
    d = out / "r"
    d.mkdir()
    path = conv.convert(source, prof, recipe, data.x, d)
    return {"file_bytes": sum(p.stat().st_size for p in [path] if p.is_file())}


def _child_plain_tflite(model: Path, calib: Path, out: Path) -> dict:
    import numpy as np
    import tensorflow as tf

    x = np.load(calib)["x"]
    m = tf.keras.models.load_model(model, compile=False)
    conv = tf.lite.TFLiteConverter.from_keras_model(m)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([x[i : i + 1]] for i in range(len(x)))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    flat = conv.convert()
    (out / "plain.tflite").write_bytes(flat)
    return {"file_bytes": len(flat)}


def _child_plain_ort(model: Path, calib: Path, out: Path) -> dict:
    import numpy as np
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if model.suffix == ".onnx":
        src = model
    else:  # the export a user would do: tf2onnx from the Keras model
        src = out / "float.onnx"
        subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(_export(model, out)), "--output", str(src),
                        "--opset", "17"], check=True, capture_output=True)
    pre = out / "pre.onnx"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
    x = np.load(calib)["x"]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(x[i : i + 1] for i in range(len(x)))

        def get_next(self):
            a = next(self.it, None)
            return None if a is None else {name: a}

    quantize_static(str(pre), str(out / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return {"file_bytes": (out / "q.onnx").stat().st_size}


def _export(model: Path, out: Path) -> Path:
    import tensorflow as tf

    m = tf.keras.models.load_model(model, compile=False)
    d = out / "sm"
    m.export(str(d), input_signature=[tf.TensorSpec((1, *m.inputs[0].shape[1:]), tf.float32)], verbose=False)
    return d


def _child(argv: list[str]) -> int:
    kind, model, calib, out = argv[0], Path(argv[1]), Path(argv[2]), Path(argv[3])
    from bench.harness import quiet

    t0 = time.perf_counter()
    error = None
    with quiet():
        try:
            if kind == "plain-tflite":
                info = _child_plain_tflite(model, calib, out)
            elif kind == "plain-ort":
                info = _child_plain_ort(model, calib, out)
            else:
                fmt, recipe = argv[4], argv[5]
                info = _child_edgekit_recipe(model, calib, fmt, recipe, out)
        except Exception as e:  # a failing side is a row, not a crash
            info, error = {}, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sub = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # e.g. a tf2onnx export process
    info |= {"wall_s": time.perf_counter() - t0, "peak_rss_mb": max(own, sub), "own_peak_rss_mb": own, "subprocess_peak_rss_mb": sub,
             "error": error}
    print("RESULT " + json.dumps(info), flush=True)
    return 0


def _run_sampled(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, str, dict[str, float]]:
    """Run ``cmd`` to completion; also the largest sum of RSS over it and every process under it, sampled every 50 ms
    (a parent waiting on a tf2onnx export still holds its own memory while the export runs), and the last stderr
    line printed before that peak (``edgekit convert`` names each step there: the step the peak fell in), and the
    peak of every such step, in MiB."""
    import threading

    import psutil

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, at = [0], [""]
    lines: list[str] = []
    steps: dict[str, int] = {}  # step -> the largest sum sampled while it was the last one printed
    done = threading.Event()

    def sample() -> None:
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not done.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            step = next((ln for ln in reversed(lines) if ln.startswith("- ")), "- start")[2:]
            if total > peak[0]:
                peak[0], at[0] = total, step
            steps[step] = max(steps.get(step, 0), total)
            done.wait(0.05)

    def read_stderr() -> None:
        assert proc.stderr is not None
        for ln in proc.stderr:
            lines.append(ln.rstrip("\n"))

    t, r = threading.Thread(target=sample, daemon=True), threading.Thread(target=read_stderr, daemon=True)
    t.start()
    r.start()
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    proc.wait()
    r.join()
    done.set()
    t.join()
    return (subprocess.CompletedProcess(cmd, proc.returncode, stdout, "\n".join(lines)), peak[0] / 2**20, at[0],
            {k: v / 2**20 for k, v in steps.items()})


def _run_child(args: list[str], scratch: Path, label: str) -> dict:
    out = scratch / f"run-{label}".replace(" ", "_").replace("/", "_")
    out.mkdir()
    proc, tree, _, _ = _run_sampled([sys.executable, str(Path(__file__).resolve()), "--child", *args[:3], str(out), *args[3:]])
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"wall_s": None, "peak_rss_mb": None, "tree_peak_rss_mb": tree, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"}
    return json.loads(line[len("RESULT "):]) | {"tree_peak_rss_mb": tree}


def _outputs_summary(report: dict) -> list[dict]:
    """Per bundle: profile, format, recipe and the per-output figures (SQNR, cosine) the report holds."""
    rows = []
    for r in report.get("results", []):
        m = r.get("metrics", {})
        rows.append({"profile": r["profile"], "format": r["format"], "recipe": r["recipe"],
                     **{k: v.get("value") for k, v in m.items() if k.split(".")[0] in ("sqnr_db", "cosine", "agreement", "accuracy_drop")}})
    return rows


def _run_full(model: Path, calib: Path, scratch: Path, label: str) -> dict:
    """The whole CLI run for every profile in FULL_PROFILES, every format they take (``--allow-over-budget`` for the
    random-weight keras.applications classifiers, whose int8 softmax rounds to 0 and so misses any budget)."""
    out = scratch / f"full-{label}"
    t0 = time.perf_counter()
    extra = ["--allow-over-budget"] if label in ("efficientnetb0", "mobilenetv3small", "resnet50") else []
    # Through sh, which forks the run: a process exec'd straight from this one would inherit this process's peak RSS
    # (the models built here) as its own ru_maxrss.
    proc, tree, step, steps = _run_sampled(["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-c", "import resource, sys; from edgekit.cli import main; rc = main(sys.argv[1:]); "
                                     "print('PEAK', *(resource.getrusage(w).ru_maxrss / 1024 for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))); "
                                     "sys.exit(rc)",
                                     "convert", str(model), *(a for p in FULL_PROFILES for a in ("--profile", p)), "--calibration", str(calib),
                                     "--out", str(out), "--latency-runs", "5", "--max-memory", "8000", *extra])
    wall = time.perf_counter() - t0
    own, sub = next(((float(ln.split()[1]), float(ln.split()[2])) for ln in proc.stdout.splitlines() if ln.startswith("PEAK")), (None, None))
    errs = [ln for ln in proc.stderr.splitlines() if ln.startswith(("Error:", "Hint:"))]
    err = None if proc.returncode == 0 else " ".join(errs)[:300] or f"exit {proc.returncode}"
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    return {"wall_s": wall, "exit": proc.returncode, "peak_rss_mb": max(own, sub) if own is not None else None, "own_peak_rss_mb": own,
            "subprocess_peak_rss_mb": sub, "tree_peak_rss_mb": tree, "tree_peak_during": step, "step_peaks_mb": steps, "args": extra,
            "task": report.get("task"), "bundles": _outputs_summary(report), "error": err}


def _worst(r: dict) -> float:
    """The figure the goal is judged on: the larger of the biggest single process's peak and the sampled peak of all at once."""
    return max(r["peak_rss_mb"] or 0.0, r.get("tree_peak_rss_mb") or 0.0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    ap = argparse.ArgumentParser(prog="bench/convert_memory.py")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--skip-full", action="store_true", help="skip the whole 'edgekit convert' runs")
    ap.add_argument("--full-only", action="store_true", help="only the whole 'edgekit convert' runs (models may also be detector, stateful, zoo-squeezenet)")
    ap.add_argument("--sides", default="", help="comma-separated label endings: only the sides whose label ends with one (e.g. qdq-minmax-per-channel,keep1,plain ort)")
    a = ap.parse_args(argv)
    scratch = prepare_process()
    host = host_facts()
    name_out = f"{NAME}_full" if a.full_only else NAME  # a full-only run does not overwrite the per-recipe results
    rows, results = [], []
    sides = [("edgekit tflite int8-per-channel", ["tflite", "int8-per-channel"]),
             ("edgekit tflite int8-cle-bias-corrected", ["tflite", "int8-cle-bias-corrected"]), ("edgekit tflite int16x8", ["tflite", "int16x8"]),
             ("plain tflite", None), ("edgekit onnx qdq-minmax-per-channel", ["onnx", "qdq-minmax-per-channel"]),
             ("edgekit onnx qdq-minmax-per-channel-cle-bc", ["onnx", "qdq-minmax-per-channel-cle-bc"]),
             ("edgekit onnx qdq-percentile-per-channel-bc", ["onnx", "qdq-percentile-per-channel-bc"]),
             ("edgekit onnx qdq-minmax-per-channel-keep1", ["onnx", "qdq-minmax-per-channel-keep1"]), ("plain ort", None)]
    if a.full_only:
        sides = []
    elif a.sides:
        sides = [(label, spec) for label, spec in sides if any(label.endswith(k) for k in a.sides.split(","))]
    for name in a.models.split(","):
        print(f"{name}: building", flush=True)
        model, calib = _build(name, scratch, a.samples)
        size_mb = model.stat().st_size / 1e6
        for label, spec in sides:
            if model.suffix == ".onnx" and "tflite" in label:
                continue
            print(f"{name}: {label}", flush=True)
            if spec is None:
                r = _run_child(["plain-tflite" if "tflite" in label else "plain-ort", str(model), str(calib)], scratch, f"{name}-{label}")
            else:
                r = _run_child(["edgekit", str(model), str(calib), *spec], scratch, f"{name}-{label}")
            results.append({"model": name, "model_mb": size_mb, "side": label, **r})
            print(f"  -> {r}", flush=True)
            write_result(name_out, host, {"samples": a.samples, "goal_mb": GOAL_MB, "results": results, "complete": False})
        if not a.skip_full:
            print(f"{name}: edgekit convert (whole run)", flush=True)
            results.append({"model": name, "model_mb": size_mb, "side": "edgekit convert (whole run)",
                            **_run_full(model, calib, scratch, name)})
            print(f"  -> {results[-1]}", flush=True)
            write_result(name_out, host, {"samples": a.samples, "goal_mb": GOAL_MB, "results": results, "complete": False})
    for r in results:
        ok = r["peak_rss_mb"] is not None and _worst(r) <= GOAL_MB
        rows.append([r["model"], r["side"], f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] else "-",
                     f"{r['tree_peak_rss_mb']:.0f}" if r.get("tree_peak_rss_mb") else "-", f"{r['wall_s']:.1f}" if r["wall_s"] else "-",
                     "yes" if ok else "NO", "; ".join(x for x in (r["error"], r.get("tree_peak_during") and f"peak during: {r['tree_peak_during']}") if x)])
    print_table(f"Peak RSS per recipe (fresh process each), {a.samples} calibration images, goal <= {GOAL_MB} MB",
                ["model", "side", "peak RSS MB (largest process)", "all processes at once MB (sampled)", "wall s", "<= 4 GB", "error"], rows,
                text_columns=2)
    worst = max((_worst(r) for r in results if r["side"].startswith("edgekit") and r["peak_rss_mb"]), default=0.0)
    ratios = [Ratio("worst edgekit peak RSS / 4 GB", worst / GOAL_MB, 1.0, "any recipe or whole run, any model, all its processes at once")]
    print_table("Goal", ["ratio", "value", "goal", "met"], ratio_rows(ratios))
    write_result(name_out, host, {"samples": a.samples, "goal_mb": GOAL_MB, "results": results, "complete": True,
                              "ratios": [r.to_dict() for r in ratios]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
