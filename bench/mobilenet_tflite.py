"""MobileNetV2 (224x224, random weights): float vs full-INT8 TFLite size and LiteRT latency.

The model is ``keras.applications.MobileNetV2(weights=None)`` with a fixed seed: nothing is
downloaded, so accuracy means nothing here; size and speed do not depend on the weights.
Both files come from edgekit's own converter (``converters.tflite.TFLiteConverter`` on the
source ``load_source`` returns; it converts Keras models from a batch-1 clone):
``convert_float`` for float32 and the first recipe the raspberry-pi-5 profile gets
(``int8-per-channel``: full int8, int8 I/O) for INT8, calibrated on 50 images drawn uniformly
from [-1, 1] (MobileNetV2's input range). The per-tensor recipe is converted too, for its size
only.

Latency: ``invoke()`` alone (the input is set once) with a bare LiteRT Interpreter and its
default XNNPACK delegate, at 1 thread and at ``os.cpu_count()`` threads. The four
(model, threads) configurations are timed in interleaved rounds of ``--block`` invokes after
10 warm-up invokes each; p50 over all rounds.

    python bench/mobilenet_tflite.py [--rounds 15] [--block 20]
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

import numpy as np

from bench.harness import ROOT, build_mobilenet_v2, OtherLoad, Ratio, host_facts, prepare_process, print_table, quiet, ratio_rows, write_result

NAME = "mobilenet_tflite"
PROFILE = "raspberry-pi-5"
GOAL_SIZE_RATIO = 0.27
CALIBRATION_IMAGES = 50
SEED = 0


def int8_size_breakdown(path: Path) -> dict[str, int]:
    """Bytes of a .tflite by content: constant buffers by dtype, quantization parameters, the rest."""
    from tensorflow.lite.python import schema_py_generated as schema  # TensorFlow's reader for the .tflite flatbuffer

    model = schema.Model.GetRootAsModel(path.read_bytes(), 0)
    type_names = {v: k.lower() for k, v in vars(schema.TensorType).items() if isinstance(v, int) and not k.startswith("_")}
    out: dict[str, int] = {}
    seen: set[int] = set()  # identical constants (e.g. all-zero biases) share one buffer
    quant_params = 0
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for i in range(graph.TensorsLength()):
            t = graph.Tensors(i)
            q = t.Quantization()
            if q is not None:
                quant_params += q.ScaleLength() * 4 + q.ZeroPointLength() * 8  # float32 scales, int64 zero points
            if t.Buffer() in seen:
                continue
            seen.add(t.Buffer())
            if n := model.Buffers(t.Buffer()).DataLength():
                key = f"constant {type_names[t.Type()]}"
                out[key] = out.get(key, 0) + n
    out["quantization parameters (scales, zero points)"] = quant_params
    out["rest (graph, names, shapes, metadata)"] = path.stat().st_size - sum(out.values())
    return out


def load_interpreter(path: Path, threads: int):
    """A LiteRT Interpreter with the default delegates (XNNPACK), input set to a fixed random image."""
    from ai_edge_litert.interpreter import Interpreter

    with quiet():
        interp = Interpreter(model_path=str(path), num_threads=threads)
        interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    x = np.random.default_rng(SEED + 1).uniform(-1, 1, inp["shape"]).astype(np.float32)
    if inp["dtype"] != np.float32:
        scale, zero = inp["quantization"]
        info = np.iinfo(inp["dtype"])
        x = np.clip(np.rint(x / scale) + zero, info.min, info.max).astype(inp["dtype"])
    interp.set_tensor(inp["index"], x)
    return interp


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="Interleaved rounds (default 15).")
    ap.add_argument("--block", type=int, default=20, help="Invokes per configuration per round (default 20).")
    args = ap.parse_args(argv)
    scratch = prepare_process()
    host = host_facts()

    from converters.source import import_tensorflow

    import_tensorflow()
    from converters.tflite import TFLiteConverter
    from edgekit.profiles import find_profile

    print("mobilenet_tflite: building and converting MobileNetV2 (random weights) ...", flush=True)
    source = build_mobilenet_v2(scratch, SEED)
    profile = find_profile(PROFILE)
    conv = TFLiteConverter()
    recipes = {r.name: r for r in conv.recipes(profile, CALIBRATION_IMAGES, CALIBRATION_IMAGES)}
    calib = np.random.default_rng(SEED).uniform(-1, 1, (CALIBRATION_IMAGES, 224, 224, 3)).astype(np.float32)
    files: dict[str, Path] = {}
    convert_s: dict[str, float] = {}
    for label, recipe in [("float32", None), ("int8", "int8-per-channel"), ("int8 per-tensor", "int8-per-tensor")]:
        d = scratch / label.replace(" ", "-")
        d.mkdir()
        t0 = time.perf_counter()
        with quiet():
            files[label] = conv.convert_float(source, d) if recipe is None else conv.convert(source, profile, recipes[recipe], calib, d)
        convert_s[label] = time.perf_counter() - t0
    sizes = {k: p.stat().st_size for k, p in files.items()}
    gzipped = {k: len(gzip.compress(p.read_bytes(), compresslevel=6)) for k, p in files.items()}  # what a download moves

    threads = (1, os.cpu_count() or 1)
    configs = [(m, n) for n in dict.fromkeys(threads) for m in ("float32", "int8")]
    interps = {c: load_interpreter(files[c[0]], c[1]) for c in configs}
    for interp in interps.values():
        for _ in range(10):
            interp.invoke()
    samples: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    print(f"mobilenet_tflite: timing {len(configs)} configurations, {args.rounds} rounds x {args.block} invokes ...", flush=True)
    with OtherLoad() as load:
        for r in range(args.rounds):
            order = configs if r % 2 == 0 else list(reversed(configs))
            for c in order:
                invoke, times = interps[c].invoke, samples[c]
                for _ in range(args.block):
                    t0 = time.perf_counter()
                    invoke()
                    times.append((time.perf_counter() - t0) * 1e3)
    p50 = {c: float(np.percentile(v, 50)) for c, v in samples.items()}
    p90 = {c: float(np.percentile(v, 90)) for c, v in samples.items()}
    best = {c: float(np.min(v)) for c, v in samples.items()}  # the uncontended figure on a shared machine

    ratios = [Ratio("size int8 / float32", sizes["int8"] / sizes["float32"], GOAL_SIZE_RATIO, "int8-per-channel, edgekit's first recipe")]
    ratios += [Ratio(f"latency p50 int8 / float32, {n} thread{'s' if n > 1 else ''}", p50[("int8", n)] / p50[("float32", n)], None)
               for n in dict.fromkeys(threads)]
    ratios += [Ratio(f"latency min int8 / float32, {n} thread{'s' if n > 1 else ''}", best[("int8", n)] / best[("float32", n)], None,
                     "best single run: the least disturbed by other load") for n in dict.fromkeys(threads)]
    ratios.append(Ratio("size int8 per-tensor / float32", sizes["int8 per-tensor"] / sizes["float32"], None, "for reference"))
    ratios.append(Ratio("gzip size int8 / float32", gzipped["int8"] / gzipped["float32"], None, "for reference: transfer size"))
    breakdown = int8_size_breakdown(files["int8"])

    print_table("MobileNetV2 224x224 (random weights): files", ["model", "bytes", "gzip -6 bytes", "convert s"],
                [[k, f"{v:,}", f"{gzipped[k]:,}", f"{convert_s[k]:.1f}"] for k, v in sizes.items()])
    print_table("int8-per-channel file, by content", ["part", "bytes", "share"],
                [[k, f"{v:,}", f"{v / sizes['int8']:.1%}"] for k, v in breakdown.items()])
    print_table(f"LiteRT invoke latency, ms ({args.rounds * args.block} runs each)", ["model", "threads", "p50", "p90", "min"],
                [[m, str(n), f"{p50[(m, n)]:.3f}", f"{p90[(m, n)]:.3f}", f"{best[(m, n)]:.3f}"] for m, n in configs])
    print_table("Ratios (lower is better)", ["ratio", "value", "goal", "met"], ratio_rows(ratios))
    print(load.describe())

    path = write_result(NAME, host, {
        "what": __doc__,
        "model": "keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3)), seed 0",
        "calibration": f"{CALIBRATION_IMAGES} images uniform in [-1, 1], seed {SEED}",
        "params": int(source.param_count),
        "bytes": sizes,
        "gzip_bytes": gzipped,
        "convert_seconds": convert_s,
        "int8_bytes_by_content": breakdown,
        "other_load_cores": load.cores,
        "latency_ms": {f"{m}@{n}": {"p50": p50[(m, n)], "p90": p90[(m, n)], "min": best[(m, n)], "runs": len(samples[(m, n)])}
                       for m, n in configs},
        "ratios": [r.to_dict() for r in ratios],
    })
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
