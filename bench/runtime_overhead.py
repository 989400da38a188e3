"""``LocalModel.predict`` vs the LiteRT loop a user writes by hand, batch 1, MNIST bundle.

The bundle comes from ``run_convert`` on the MNIST example (raspberry-pi-5, tflite). Sides,
each on its own LiteRT Interpreter over the same .tflite with the same settings (default
threads, default XNNPACK delegate), each fed the same 256 eval images in turn:

- edgekit: ``edgekit.runtime.load(bundle).predict(x)``, float in, float out.
- hand loop, np.rint: the caller quantizes in numpy with the input scale and zero point read
  once (``clip(rint(x / s) + z).astype(int8)``), ``set_tensor``/``invoke``/``get_tensor``,
  then dequantizes (``(q - z) * s``). This is the goal's baseline.
- hand loop, half-away: the same, rounding half away from zero as edgekit's ``quantize`` does
  (``trunc(v + copysign(0.5, v))``), to separate edgekit's rounding choice from its overhead.
- raw loop: ``set_tensor``/``invoke``/``get_tensor`` on pre-quantized inputs, no quantization.
- prototype: this file's sketch of the changes suggested for ``TFLiteModel.predict`` (not
  edgekit code), to show what they would buy; see ``SuggestedPredict``.

Outputs of every float-in side are compared with ``LocalModel.predict``'s.

``--reps`` interleaved repetitions (the order rotates) of ``--calls`` calls per side; the
figure per repetition is the mean time per call, the reported figure the median over them.
When edgekit is over the goal, each step of ``predict`` is timed on its own (best of 5
``timeit`` runs) and the steps are printed next to the hand-written ones.

    python bench/runtime_overhead.py [--reps 21] [--calls 2000]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import gc
import time
import timeit
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

    ``rounding="rint"`` is the usual ``np.rint``/``np.round`` (half to even);
    ``rounding="half_away"`` rounds half away from zero like LiteRT's own quantize kernel and
    edgekit's ``quantize``. The two differ only on exact .5 ties.
    """

    def __init__(self, path: Path, rounding: str = "rint") -> None:
        self.interp = litert(path)
        inp, out = self.interp.get_input_details()[0], self.interp.get_output_details()[0]
        self.in_index, self.out_index = inp["index"], out["index"]
        self.in_scale, self.in_zero = np.float32(inp["quantization"][0]), inp["quantization"][1]
        self.out_scale, self.out_zero = np.float32(out["quantization"][0]), out["quantization"][1]
        self.dtype = inp["dtype"]
        info = np.iinfo(self.dtype)
        self.lo, self.hi = int(info.min), int(info.max)
        self.quantize = self._quantize_rint if rounding == "rint" else self._quantize_half_away

    def _quantize_rint(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(x / self.in_scale) + self.in_zero, self.lo, self.hi).astype(self.dtype)

    def _quantize_half_away(self, x: np.ndarray) -> np.ndarray:
        v = x / self.in_scale
        return np.clip(np.trunc(v + np.copysign(np.float32(0.5), v)) + self.in_zero, self.lo, self.hi).astype(self.dtype)

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


class SuggestedPredict:
    """A sketch of ``TFLiteModel.predict`` with the suggested changes; same checks, and the same
    arithmetic as edgekit's ``quantize``/``dequantize`` (float32 scale, half away from zero).

    1. Quantization constants (scale, zero point, integer bounds, dtypes) are plain Python and
       numpy scalars computed once at load time, not looked up through the manifest's pydantic
       specs, ``np.dtype`` and ``np.iinfo`` on every call.
    2. A batch of one is invoked directly: no per-row slicing, list or ``np.concatenate``.
    """

    def __init__(self, path: Path) -> None:
        self.interp = litert(path)
        inp, out = self.interp.get_input_details()[0], self.interp.get_output_details()[0]
        self._in_index, self._out_index = inp["index"], out["index"]
        self._in_tail = tuple(int(d) for d in inp["shape"][1:])
        self._in_dtype = np.dtype(inp["dtype"])
        info = np.iinfo(self._in_dtype)
        self._in_scale, self._in_zero = np.float32(inp["quantization"][0]), int(inp["quantization"][1])
        self._lo, self._hi = int(info.min), int(info.max)
        self._out_scale, self._out_zero = np.float32(out["quantization"][0]), int(out["quantization"][1])
        self._set, self._invoke, self._get = self.interp.set_tensor, self.interp.invoke, self.interp.get_tensor

    def _run(self, q: np.ndarray) -> np.ndarray:
        self._set(self._in_index, q)
        self._invoke()
        return self._get(self._out_index)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Float in, float out, any batch size."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape[1:] != self._in_tail:
            raise ValueError(f"input shape {x.shape} does not fit {self._in_tail}")
        v = x / self._in_scale
        q = np.clip(np.trunc(v + np.copysign(np.float32(0.5), v)) + self._in_zero, self._lo, self._hi).astype(self._in_dtype)
        out = self._run(q) if q.shape[0] == 1 else np.concatenate([self._run(q[i : i + 1]) for i in range(q.shape[0])])
        return (out.astype(np.float32) - self._out_zero) * self._out_scale


def time_block(fn: Callable[[np.ndarray], object], inputs: list[np.ndarray], calls: int) -> float:
    """Mean seconds per call over ``calls`` calls, cycling through ``inputs``."""
    n = len(inputs)
    gc.collect()
    t0 = time.perf_counter()
    for i in range(calls):
        fn(inputs[i % n])
    return (time.perf_counter() - t0) / calls


def step_costs(model, hand: HandQuantized, hand_away: HandQuantized, x: np.ndarray) -> list[tuple[str, float, float | None]]:
    """Microseconds of each step of ``LocalModel.predict`` and of the hand-written equivalent."""
    from edgekit.runtime import dequantize, quantize

    q = quantize(x, model._in_spec)
    raw_out = model.invoke_raw(q)
    outs = [raw_out]

    def us(stmt: Callable[[], object], number: int = 20000) -> float:
        return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e6

    return [
        ("np.asarray + shape check", us(lambda: (np.asarray(x, dtype=np.float32).shape[1:] != model._in_shape[1:])), None),
        ("quantize(x, spec) vs hand np.rint", us(lambda: quantize(x, model._in_spec)), us(lambda: hand.quantize(x))),
        ("  hand, half away from zero like edgekit", None, us(lambda: hand_away.quantize(x))),
        ("  np.iinfo + np.dtype, paid per call", us(lambda: np.iinfo(np.dtype(model._in_spec.dtype))), None),
        ("slice + list + invoke_raw (set/invoke/get)",
         us(lambda: [model.invoke_raw(q[i : i + 1]) for i in range(q.shape[0])]), us(lambda: hand.raw(q))),
        ("  interpreter.invoke() alone", us(lambda: model._interp.invoke()), None),
        ("np.concatenate of the outputs", us(lambda: np.concatenate(outs, axis=0)), None),
        ("dequantize(out, spec)", us(lambda: dequantize(raw_out, model._out_spec)),
         us(lambda: (raw_out.astype(np.float32) - hand.out_zero) * hand.out_scale)),
        ("whole predict", us(lambda: model.predict(x)), us(lambda: hand.predict(x))),
    ]


def agreement(reference: Callable[[np.ndarray], np.ndarray], other: Callable[[np.ndarray], np.ndarray], inputs: list[np.ndarray]) -> dict:
    """How many outputs of ``other`` equal ``reference``'s exactly, and the largest difference."""
    diffs = [float(np.abs(reference(x) - other(x)).max()) for x in inputs]
    return {"identical": sum(d == 0.0 for d in diffs), "of": len(diffs), "max_abs_diff": max(diffs)}


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
    hand, hand_away, proto = HandQuantized(tflite), HandQuantized(tflite, "half_away"), SuggestedPredict(tflite)

    from examples.mnist.train import ensure_example

    x_eval = np.load(ensure_example(ROOT / ".cache" / "examples" / "mnist")["eval"])["x"][:INPUTS]
    inputs = [np.ascontiguousarray(x_eval[i : i + 1]) for i in range(len(x_eval))]
    quantized = [hand_away.quantize(x) for x in inputs]
    same = {"hand np.rint": agreement(model.predict, hand.predict, inputs),
            "hand half away": agreement(model.predict, hand_away.predict, inputs),
            "prototype": agreement(model.predict, proto.predict, inputs)}

    sides: dict[str, tuple[Callable[[np.ndarray], object], list[np.ndarray]]] = {
        "edgekit LocalModel.predict": (model.predict, inputs),
        "hand loop, np.rint quantize": (hand.predict, inputs),
        "hand loop, half-away quantize (as edgekit)": (hand_away.predict, inputs),
        "raw loop, no quantization": (hand.raw, quantized),
        "prototype of the suggestions (not edgekit)": (proto.predict, inputs),
    }
    names = list(sides)
    for name in names:  # warm-up
        time_block(sides[name][0], sides[name][1], 200)
    per_call: dict[str, list[float]] = {n: [] for n in names}
    print(f"runtime_overhead: {args.reps} interleaved reps x {args.calls} calls per side ...", flush=True)
    with OtherLoad() as load:
        for rep in range(args.reps):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                fn, xs = sides[name]
                per_call[name].append(time_block(fn, xs, args.calls))
    med = {n: median(v) * 1e6 for n, v in per_call.items()}
    edge, handq, hand_aw, raw, proto_us = (med[n] for n in names)
    ratios = [
        Ratio("edgekit / hand loop (np.rint)", edge / handq, GOAL_OVERHEAD, "the overhead goal: what a user writes"),
        Ratio("edgekit / hand loop (same rounding)", edge / hand_aw, None, "edgekit's overhead with its rounding choice factored out"),
        Ratio("edgekit / raw loop", edge / raw, None, "float I/O plus edgekit's overhead"),
        Ratio("hand loop (np.rint) / raw loop", handq / raw, None, "numpy quantize/dequantize alone"),
        Ratio("prototype / hand loop (np.rint)", proto_us / handq, None, "with the suggested changes"),
        Ratio("prototype / hand loop (same rounding)", proto_us / hand_aw, None, "with the suggested changes"),
    ]

    print_table(f"Batch-1 MNIST inference, µs per call (median of {args.reps} reps x {args.calls} calls)",
                ["side", "µs/call", "vs hand np.rint"], [[n, f"{med[n]:.2f}", f"{med[n] / handq:.3f}"] for n in names])
    print_table("Ratios (lower is better)", ["ratio", "value", "goal", "met"], ratio_rows(ratios))
    print(load.describe())
    print_table(f"Outputs compared with LocalModel.predict on {len(inputs)} inputs", ["side", "identical", "max abs diff"],
                [[k, f"{v['identical']}/{v['of']}", f"{v['max_abs_diff']:.3g}"] for k, v in same.items()])

    steps = None
    if ratios[0].met is False:
        steps = step_costs(model, hand, hand_away, inputs[0])
        print_table("Where LocalModel.predict spends its time (µs, best of 5 timeit runs of 20,000)", ["step", "edgekit", "hand-written"],
                    [[s, "" if e is None else f"{e:.2f}", "" if h is None else f"{h:.2f}"] for s, e, h in steps])

    path = write_result(NAME, host, {
        "what": __doc__,
        "bundle": f"examples/mnist CNN via run_convert, profile {PROFILE}, tflite ({tflite.stat().st_size} bytes)",
        "reps": args.reps,
        "calls_per_rep": args.calls,
        "other_load_cores": load.cores,
        "us_per_call": {n: {"median": med[n], "runs": [v * 1e6 for v in per_call[n]]} for n in names},
        "outputs_vs_edgekit": same,
        "ratios": [r.to_dict() for r in ratios],
        "predict_steps_us": None if steps is None else [{"step": s, "edgekit": e, "hand": h} for s, e, h in steps],
    })
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
