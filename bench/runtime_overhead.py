"""``LocalModel.predict`` vs the LiteRT loop a user writes by hand, batch 1, MNIST bundle.

The bundle comes from ``run_convert`` on the MNIST example (raspberry-pi-5, tflite). Sides,
each on its own LiteRT Interpreter over the same .tflite with the same settings (default
threads, default XNNPACK delegate), each fed the same 256 eval images in turn:

- edgekit: ``edgekit.runtime.load(bundle).predict(x)``, float in, float out.
- (a) hand loop, np.rint: what most users write. The input scale and zero point are read once
  from ``get_input_details()``; per call ``clip(rint(x / s) + z).astype(int8)`` in float32,
  ``set_tensor``/``invoke``/``get_tensor``, then ``(q - z) * s``.
- (b) hand loop, half away from zero: the same loop with the rounding edgekit uses (and
  LiteRT's own quantize kernel, ``std::round``): ``trunc(v + copysign(0.5, v))`` with ``v``
  in float64. This does the same arithmetic as edgekit, so edgekit / (b) is the like-for-like
  overhead; edgekit / (a) also contains the cost of the exact rounding.
- (c) raw loop: ``set_tensor``/``invoke``/``get_tensor`` on pre-quantized inputs, no
  quantization: the floor any float-in, float-out wrapper sits on.

Only edgekit's public API is used (``load``, ``predict``, the ``inputs``/``outputs`` specs);
the quantization the specs report is checked against the Interpreter's own. Outputs of (a)
and (b) are compared with ``LocalModel.predict``'s.

``--reps`` interleaved repetitions (the order rotates) of ``--calls`` calls per side; the
figure per repetition is the mean time per call, the reported figure the median over them.

    python bench/runtime_overhead.py [--reps 21] [--calls 2000]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import numpy as np

from bench.harness import ROOT, OtherLoad, Ratio, host_facts, median, prepare_process, print_table, quiet, ratio_rows, write_result

NAME = "runtime_overhead"
PROFILE = "raspberry-pi-5"
GOAL_OVERHEAD = 1.05
INPUTS = 256


def build_bundle(scratch: Path) -> Path:
    """An MNIST bundle from ``run_convert``, as ``edgekit convert`` writes it."""
    from converters.pipeline import ConvertOptions, run_convert
    from examples.mnist.train import ensure_example

    files = ensure_example(ROOT / ".cache" / "examples" / "mnist")
    opts = ConvertOptions(model=files["model"], profiles=(PROFILE,), calibration=files["calib"], out=scratch / "bundles",
                          formats=("tflite",), eval=files["eval"])
    with quiet():
        return run_convert(opts).results[0].bundle_dir


def litert(path: Path):
    """A LiteRT Interpreter as a user creates one: defaults for threads and delegates."""
    from ai_edge_litert.interpreter import Interpreter

    with quiet():
        interp = Interpreter(model_path=str(path))
        interp.allocate_tensors()
    return interp


class HandQuantized:
    """What a user writes around a bare Interpreter: quantize, invoke, dequantize.

    ``rounding="rint"`` is the usual ``np.rint`` (half to even) in float32;
    ``rounding="half_away"`` rounds half away from zero in float64, exactly as LiteRT's
    ``std::round`` and edgekit's ``quantize`` do.
    """

    def __init__(self, path: Path, rounding: str = "rint") -> None:
        self.interp = litert(path)
        inp, out = self.interp.get_input_details()[0], self.interp.get_output_details()[0]
        self.in_index, self.out_index = inp["index"], out["index"]
        self.in_scale, self.in_zero = float(inp["quantization"][0]), int(inp["quantization"][1])
        self.in_scale32 = np.float32(self.in_scale)
        self.out_scale, self.out_zero = np.float32(out["quantization"][0]), int(out["quantization"][1])
        self.dtype = inp["dtype"]
        info = np.iinfo(self.dtype)
        self.lo, self.hi = int(info.min), int(info.max)
        self.quantize = self._quantize_rint if rounding == "rint" else self._quantize_half_away

    def _quantize_rint(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(x / self.in_scale32) + self.in_zero, self.lo, self.hi).astype(self.dtype)

    def _quantize_half_away(self, x: np.ndarray) -> np.ndarray:
        v = x.astype(np.float64) / self.in_scale
        return np.clip(np.trunc(v + np.copysign(0.5, v)) + self.in_zero, self.lo, self.hi).astype(self.dtype)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """One batch-1 inference, float in and out."""
        self.interp.set_tensor(self.in_index, self.quantize(x))
        self.interp.invoke()
        return (self.interp.get_tensor(self.out_index).astype(np.float32) - self.out_zero) * self.out_scale

    def raw(self, q: np.ndarray) -> np.ndarray:
        """One inference on an already-quantized input; the integer output."""
        self.interp.set_tensor(self.in_index, q)
        self.interp.invoke()
        return self.interp.get_tensor(self.out_index)


def check_specs(model, hand: HandQuantized) -> None:
    """edgekit's public specs must describe the same quantization the Interpreter reports."""
    i, o = model.inputs[0], model.outputs[0]
    assert i.quantization is not None and o.quantization is not None, "expected a full-integer model"
    assert np.dtype(i.dtype) == np.dtype(hand.dtype), (i.dtype, hand.dtype)
    assert (i.quantization.scale, i.quantization.zero_point) == (hand.in_scale, hand.in_zero), i.quantization
    assert (np.float32(o.quantization.scale), o.quantization.zero_point) == (hand.out_scale, hand.out_zero), o.quantization


def time_block(fn: Callable[[np.ndarray], object], inputs: list[np.ndarray], calls: int) -> float:
    """Mean seconds per call over ``calls`` calls, cycling through ``inputs``."""
    n = len(inputs)
    gc.collect()
    t0 = time.perf_counter()
    for i in range(calls):
        fn(inputs[i % n])
    return (time.perf_counter() - t0) / calls


def agreement(reference: Callable[[np.ndarray], np.ndarray], other: Callable[[np.ndarray], np.ndarray], inputs: list[np.ndarray]) -> dict:
    """How many outputs of ``other`` equal ``reference``'s exactly, and the largest difference."""
    diffs = [float(np.abs(reference(x) - other(x)).max()) for x in inputs]
    return {"identical": sum(d == 0.0 for d in diffs), "of": len(diffs), "max_abs_diff": max(diffs)}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """25th, 50th and 75th percentiles."""
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=21, help="Interleaved repetitions (default 21).")
    ap.add_argument("--calls", type=int, default=2000, help="Calls per side per repetition (default 2000).")
    args = ap.parse_args(argv)
    scratch = prepare_process()
    host = host_facts()

    import edgekit.runtime

    print("runtime_overhead: building the MNIST bundle with run_convert ...", flush=True)
    bundle = build_bundle(scratch)
    with quiet():
        model = edgekit.runtime.load(bundle)
    tflite = bundle / model.manifest.file
    hand, hand_away = HandQuantized(tflite), HandQuantized(tflite, "half_away")
    check_specs(model, hand)

    from examples.mnist.train import ensure_example

    x_eval = np.load(ensure_example(ROOT / ".cache" / "examples" / "mnist")["eval"])["x"][:INPUTS].astype(np.float32)
    inputs = [np.ascontiguousarray(x_eval[i : i + 1]) for i in range(len(x_eval))]
    quantized = [edgekit.runtime.quantize(x, model.inputs[0]) for x in inputs]  # public helper, same rounding as predict
    same = {"(a) hand loop, np.rint": agreement(model.predict, hand.predict, inputs),
            "(b) hand loop, half away (float64)": agreement(model.predict, hand_away.predict, inputs)}
    q_same = {"(a) np.rint": sum(np.array_equal(q, hand.quantize(x)) for q, x in zip(quantized, inputs)),
              "(b) half away (float64)": sum(np.array_equal(q, hand_away.quantize(x)) for q, x in zip(quantized, inputs))}

    sides: dict[str, tuple[Callable[[np.ndarray], object], list[np.ndarray]]] = {
        "edgekit LocalModel.predict": (model.predict, inputs),
        "(a) hand loop, np.rint quantize": (hand.predict, inputs),
        "(b) hand loop, half-away float64 quantize (as edgekit)": (hand_away.predict, inputs),
        "(c) raw loop, pre-quantized input": (hand.raw, quantized),
    }
    names = list(sides)
    for name in names:  # warm-up
        time_block(sides[name][0], sides[name][1], 500)
    per_call: dict[str, list[float]] = {n: [] for n in names}
    print(f"runtime_overhead: {args.reps} interleaved reps x {args.calls} calls per side ...", flush=True)
    with OtherLoad() as load:
        for rep in range(args.reps):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                fn, xs = sides[name]
                per_call[name].append(time_block(fn, xs, args.calls))
    med = {n: median(v) * 1e6 for n, v in per_call.items()}
    edge, hand_rint, hand_aw, raw = (med[n] for n in names)
    # Per-repetition ratios (the sides of one repetition ran back to back): their spread says how firm the medians are.
    paired = {"edgekit / (b)": [e / h for e, h in zip(per_call[names[0]], per_call[names[2]])],
              "edgekit / (a)": [e / h for e, h in zip(per_call[names[0]], per_call[names[1]])]}
    ratios = [
        Ratio("edgekit / hand loop (b), same rounding", edge / hand_aw, GOAL_OVERHEAD,
              "like-for-like: the same float64 half-away-from-zero arithmetic by hand"),
        Ratio("edgekit / hand loop (a), np.rint", edge / hand_rint, GOAL_OVERHEAD,
              "against what most users write; includes the cost of LiteRT-exact rounding"),
        Ratio("edgekit / raw loop (c)", edge / raw, None, "float I/O plus edgekit's overhead"),
        Ratio("hand loop (b) / hand loop (a)", hand_aw / hand_rint, None, "the cost of exact rounding alone"),
        Ratio("hand loop (a) / raw loop (c)", hand_rint / raw, None, "numpy quantize/dequantize alone"),
    ]

    print_table(f"Batch-1 MNIST inference, µs per call (median of {args.reps} reps x {args.calls} calls)",
                ["side", "µs/call", "vs (b)", "vs (a)"],
                [[n, f"{med[n]:.2f}", f"{med[n] / hand_aw:.3f}", f"{med[n] / hand_rint:.3f}"] for n in names])
    print_table("Ratios (lower is better)", ["ratio", "value", "goal", "met"], ratio_rows(ratios))
    print_table("Per-repetition ratios", ["ratio", "q1", "median", "q3", "min", "max"],
                [[k, *(f"{v:.3f}" for v in quartiles(v)), f"{min(v):.3f}", f"{max(v):.3f}"] for k, v in paired.items()])
    print(f"edgekit adds {edge - hand_aw:.2f} µs per call over (b) and {edge - hand_rint:.2f} µs over (a); "
          f"the raw loop takes {raw:.2f} µs")
    print(load.describe())
    print_table(f"Outputs compared with LocalModel.predict on {len(inputs)} inputs", ["side", "identical", "max abs diff"],
                [[k, f"{v['identical']}/{v['of']}", f"{v['max_abs_diff']:.3g}"] for k, v in same.items()])
    print("quantized inputs identical to edgekit.runtime.quantize: "
          + ", ".join(f"{k} {v}/{len(inputs)}" for k, v in q_same.items()))

    path = write_result(NAME, host, {
        "what": __doc__,
        "bundle": f"examples/mnist CNN via run_convert, profile {PROFILE}, tflite ({tflite.stat().st_size} bytes)",
        "reps": args.reps,
        "calls_per_rep": args.calls,
        "other_load_cores": load.cores,
        "us_per_call": {n: {"median": med[n], "runs": [v * 1e6 for v in per_call[n]]} for n in names},
        "per_rep_ratios": {k: {"quartiles": quartiles(v), "min": min(v), "max": max(v)} for k, v in paired.items()},
        "outputs_vs_edgekit": same,
        "quantized_inputs_identical": {k: {"identical": v, "of": len(inputs)} for k, v in q_same.items()},
        "ratios": [r.to_dict() for r in ratios],
    })
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
