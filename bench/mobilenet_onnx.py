"""MobileNetV2 (224x224, random weights): float vs INT8 QDQ ONNX size and ONNX Runtime latency.

The model is ``keras.applications.MobileNetV2(weights=None)`` with a fixed seed: nothing is
downloaded, so accuracy means nothing here; only the INT8 model's top-1 agreement with the
float model is reported. Size and speed do not depend on the weights (with one caveat: random
weights make every folded batch-norm bias zero, so the graph has no bias tensors; a trained
model adds an int32 bias per output channel, about 17k values or 68 kB here).

Both files come from edgekit's own ONNX converter on the static batch-1 SavedModel that
``load_source`` exports: ``export_float_onnx`` (tf2onnx, opset 17, compacted names) for float32,
and ``ONNXConverter.convert`` with the first recipe the x86-64-avx512-server profile gets
(``qdq-minmax-per-channel``: QDQ, MinMax, per-channel int8 weights, uint8 activations) for INT8,
calibrated on 32 images drawn uniformly from [-1, 1] (MobileNetV2's input range). The
per-tensor recipe is converted too, for its size only.

Latency: ``InferenceSession.run`` on the CPU execution provider, batch 1, default graph
optimizations, ``intra_op_num_threads`` 1 and 2 (``inter_op`` 1). The four (model, threads)
configurations are timed in interleaved rounds of ``--block`` runs after 10 warm-up runs each;
p50 over all rounds. Agreement: top-1 of INT8 vs float on 64 other random images.

    python bench/mobilenet_onnx.py [--rounds 15] [--block 20]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import gzip
import os
import time
from collections import defaultdict

import numpy as np

from bench.harness import ROOT, build_mobilenet_v2, OtherLoad, Ratio, host_facts, prepare_process, print_table, quiet, ratio_rows, write_result

NAME = "mobilenet_onnx"
PROFILE = "x86-64-avx512-server"
GOAL_SIZE_RATIO = 0.30
CALIBRATION_IMAGES = 32
AGREEMENT_IMAGES = 64
OPSET = 17
SEED = 0


def size_breakdown(path: Path) -> dict[str, int]:
    """Bytes of an ONNX file by content: initializers by role and dtype, then the graph itself."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    role: dict[str, str] = {}
    for n in g.node:
        for i, name in enumerate(n.input):
            if n.op_type in ("DequantizeLinear", "QuantizeLinear"):
                role.setdefault(name, ("quantized data", "scales", "zero points")[min(i, 2)] if n.op_type == "DequantizeLinear" or i else "float data")
            else:
                role.setdefault(name, f"constants into {n.op_type}")
    out: dict[str, int] = defaultdict(int)
    for init in g.initializer:
        a = numpy_helper.to_array(init)
        out[f"{role.get(init.name, 'unused')} ({a.dtype.name})"] += a.nbytes
    out = dict(sorted(out.items(), key=lambda kv: -kv[1]))
    out["rest (nodes, names, shapes, protobuf framing)"] = path.stat().st_size - sum(out.values())
    return out


def ort_session(path: Path, threads: int):
    """A CPU-EP session with ``threads`` intra-op threads, sequential execution."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def node_counts(path: Path) -> dict[str, int]:
    """Op types of the graph ONNX Runtime actually runs (after its QDQ fusions), with counts."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    optimized = path.with_name(path.stem + "-ort-optimized.onnx")
    opts.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = defaultdict(int)
    for n in onnx.load(str(optimized)).graph.node:
        counts[n.op_type] += 1
    optimized.unlink()
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="Interleaved rounds (default 15).")
    ap.add_argument("--block", type=int, default=20, help="Runs per configuration per round (default 20).")
    args = ap.parse_args(argv)
    scratch = prepare_process()
    host = host_facts()
    os.environ.setdefault("COLUMNS", "150")  # rich wraps wide tables at 80 columns when not on a terminal

    from converters.source import import_tensorflow

    import_tensorflow()
    from converters.onnx import ONNXConverter, export_float_onnx
    from edgekit.profiles import find_profile

    print("mobilenet_onnx: building and converting MobileNetV2 (random weights) ...", flush=True)
    source = build_mobilenet_v2(scratch, SEED)
    profile = find_profile(PROFILE)
    conv = ONNXConverter()
    recipes = {r.name: r for r in conv.recipes(profile, CALIBRATION_IMAGES, CALIBRATION_IMAGES)}
    rng = np.random.default_rng(SEED)
    calib = rng.uniform(-1, 1, (CALIBRATION_IMAGES, 224, 224, 3)).astype(np.float32)
    probe = rng.uniform(-1, 1, (AGREEMENT_IMAGES, 224, 224, 3)).astype(np.float32)
    files: dict[str, Path] = {}
    convert_s: dict[str, float] = {}
    for label, recipe in [("float32", None), ("int8", "qdq-minmax-per-channel"), ("int8 per-tensor", "qdq-minmax-per-tensor")]:
        d = scratch / label.replace(" ", "-")
        d.mkdir()
        t0 = time.perf_counter()
        with quiet():
            files[label] = export_float_onnx(source, OPSET, d) if recipe is None else conv.convert(source, profile, recipes[recipe], calib, d)
        convert_s[label] = time.perf_counter() - t0
    # run_convert measures its float baseline with convert_float after the INT8 attempts: time what that costs again
    d = scratch / "float-baseline"
    d.mkdir()
    t0 = time.perf_counter()
    with quiet():
        conv.convert_float(source, d)
    baseline_s = time.perf_counter() - t0
    sizes = {k: p.stat().st_size for k, p in files.items()}
    gzipped = {k: len(gzip.compress(p.read_bytes(), compresslevel=6)) for k, p in files.items()}  # what a download moves
    breakdown = size_breakdown(files["int8"])
    float_breakdown = size_breakdown(files["float32"])
    kernels = node_counts(files["int8"])

    threads = tuple(dict.fromkeys((1, 2)))
    configs = [(m, n) for n in threads for m in ("float32", "int8")]
    sessions = {c: ort_session(files[c[0]], c[1]) for c in configs}
    name = sessions[configs[0]].get_inputs()[0].name
    feed = {name: probe[:1]}
    float_out = np.concatenate([sessions[("float32", 1)].run(None, {name: probe[i : i + 1]})[0] for i in range(len(probe))])
    int8_out = np.concatenate([sessions[("int8", 1)].run(None, {name: probe[i : i + 1]})[0] for i in range(len(probe))])
    agreement = float((float_out.argmax(-1) == int8_out.argmax(-1)).mean() * 100)
    classes = len(set(float_out.argmax(-1).tolist()))  # random weights: a collapsed net makes agreement trivial
    spread = float(float_out.max(-1).mean())  # mean top-1 probability (0.001 would be a uniform output)
    max_abs = float(np.abs(float_out - int8_out).max())
    keras_out = np.asarray(source.predict(probe[:8]))
    export_err = float(np.abs(keras_out - float_out[:8]).max())
    for s in sessions.values():
        for _ in range(10):
            s.run(None, feed)
    samples: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    print(f"mobilenet_onnx: timing {len(configs)} configurations, {args.rounds} rounds x {args.block} runs ...", flush=True)
    with OtherLoad() as load:
        for r in range(args.rounds):
            for c in configs if r % 2 == 0 else list(reversed(configs)):
                run, times = sessions[c].run, samples[c]
                for _ in range(args.block):
                    t0 = time.perf_counter()
                    run(None, feed)
                    times.append((time.perf_counter() - t0) * 1e3)
    p50 = {c: float(np.percentile(v, 50)) for c, v in samples.items()}
    p90 = {c: float(np.percentile(v, 90)) for c, v in samples.items()}
    best = {c: float(np.min(v)) for c, v in samples.items()}  # the uncontended figure on a shared machine

    def plural(n: int) -> str:
        return f"{n} thread{'s' if n > 1 else ''}"

    ratios = [Ratio("size int8 / float32", sizes["int8"] / sizes["float32"], GOAL_SIZE_RATIO, "qdq-minmax-per-channel, edgekit's first recipe")]
    ratios += [Ratio(f"latency p50 int8 / float32, {plural(n)}", p50[("int8", n)] / p50[("float32", n)], None) for n in threads]
    ratios += [Ratio(f"latency min int8 / float32, {plural(n)}", best[("int8", n)] / best[("float32", n)], None,
                     "best single run: the least disturbed by other load") for n in threads]
    ratios.append(Ratio("size int8 per-tensor / float32", sizes["int8 per-tensor"] / sizes["float32"], None, "for reference"))
    ratios.append(Ratio("gzip size int8 / float32", gzipped["int8"] / gzipped["float32"], None, "for reference: transfer size"))

    print_table("MobileNetV2 224x224 (random weights): ONNX files", ["model", "bytes", "gzip -6 bytes", "convert s"],
                [[k, f"{v:,}", f"{gzipped[k]:,}", f"{convert_s[k]:.1f}"] for k, v in sizes.items()])
    print(f"ONNXConverter.convert_float afterwards (run_convert's float baseline, the export already cached): {baseline_s:.1f} s")
    print_table("int8 (per-channel) file, by content", ["part", "bytes", "share"],
                [[k, f"{v:,}", f"{v / sizes['int8']:.1%}"] for k, v in breakdown.items()])
    print(f"int8 graph as ONNX Runtime runs it (after QDQ fusion): {', '.join(f'{k} {v}' for k, v in kernels.items())}")
    print(f"top-1 agreement int8 vs float on {AGREEMENT_IMAGES} random images: {agreement:.1f}% (max |diff| {max_abs:.3g}); the float "
          f"model's top-1 takes {classes} distinct classes, mean top-1 probability {spread:.4f}; float ONNX vs Keras max |diff| {export_err:.3g}")
    print_table(f"ONNX Runtime latency, ms ({args.rounds * args.block} runs each)", ["model", "threads", "p50", "p90", "min"],
                [[m, str(n), f"{p50[(m, n)]:.3f}", f"{p90[(m, n)]:.3f}", f"{best[(m, n)]:.3f}"] for m, n in configs])
    print_table("Ratios (lower is better)", ["ratio", "value", "goal", "met"], ratio_rows(ratios))
    print(load.describe())

    path = write_result(NAME, host, {
        "what": __doc__,
        "model": "keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3)), seed 0",
        "profile": PROFILE,
        "recipe": "qdq-minmax-per-channel",
        "calibration": f"{CALIBRATION_IMAGES} images uniform in [-1, 1], seed {SEED}",
        "params": int(source.param_count),
        "bytes": sizes,
        "gzip_bytes": gzipped,
        "convert_seconds": convert_s,
        "convert_float_after_convert_seconds": baseline_s,
        "int8_bytes_by_content": breakdown,
        "float_bytes_by_content": float_breakdown,
        "int8_ops_after_ort_fusion": kernels,
        "agreement_percent": agreement,
        "float_top1_distinct_classes": classes,
        "float_mean_top1_probability": spread,
        "int8_max_abs_diff": max_abs,
        "float_onnx_vs_keras_max_abs_diff": export_err,
        "other_load_cores": load.cores,
        "latency_ms": {f"{m}@{n}": {"p50": p50[(m, n)], "p90": p90[(m, n)], "min": best[(m, n)], "runs": len(samples[(m, n)])}
                       for m, n in configs},
        "ratios": [r.to_dict() for r in ratios],
    })
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
