"""Speed is part of the budget: every candidate timed on this host against the float model, and why it is slower.

What runs: LiteRT with the XNNPACK delegate it applies by default (``OpResolverType.AUTO``; the
placement code in ``coverage_runtime`` reads which nodes it took), or ONNX Runtime on the first
execution provider the profile names that this host's ONNX Runtime build has, else the CPU EP.
The profile's own accelerator (NNAPI, Edge TPU, Core ML, TensorRT) does not run here; the timing
says which unit ran instead. One intra-op thread (``TIMING_THREADS``), batch 1, through
``edgekit.runtime``'s ``predict`` (the call an app makes, including its I/O (de)quantization).

How: ``TIMING_ROUNDS`` rounds, each timing the float model and the candidate back to back (the
order alternating) for ``runs // rounds`` calls after a warm-up; a model's latency is the median of
its per-round medians, and its ratio to float the median of the per-round ratios, so a neighbour's
load that slows one round slows both models in it.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib import metadata
from pathlib import Path

import numpy as np

from converters.base import Recipe
from converters.evaluate import latency_ms
from edgekit.profiles import HardwareProfile
from edgekit.runtime import LocalModel, load_model_file

__all__ = ["DISPLACE_TOLERANCE", "FIDELITY_MARGIN_DB", "FIDELITY_MAX_PARAMS", "FIDELITY_SIBLINGS", "SPEED_CLASSES", "TIMING_ROUNDS", "TIMING_THREADS", "HostRuntime", "Speed", "displaces", "early_stop_reason",
           "fidelity_sibling", "graph_key", "host_runtime", "load_for_timing", "measure_speed", "slowdown_reason", "speed_class"]

TIMING_THREADS = 1
TIMING_ROUNDS = 5
DISPLACE_TOLERANCE = 0.05  # a later candidate must be more than 5% faster to displace an earlier one
SPEED_CLASSES = ("int8", "mixed", "int16x8")
FIDELITY_SIBLINGS = 2  # bias-corrected variants of the best graph still tried once it meets the budget (same speed, maybe more faithful)
FIDELITY_MARGIN_DB = 0.5  # a same-graph candidate displaces the best when its selection-split SQNR is this much higher
FIDELITY_MAX_PARAMS = 1_000_000  # above this the siblings are not tried: each bias-corrected TFLite recipe on MobileNetV2 (3.5M) took
# about 15 s here and doubled the search (32 -> 62 s); selection noise is a small-eval-set problem, the cost a large-model one
# Recipe option fields that change only values (ranges, rounding, weights), never the graph's ops and dtypes. A converter's
# new value-only option belongs here; an option not listed counts as changing the graph (so it is timed, not assumed).
VALUE_ONLY_OPTIONS = frozenset({"calibration_all", "method", "embed", "cle", "bias_correction"})
_QDQ_ONNX = frozenset({"QuantizeLinear", "DequantizeLinear"})
_QDQ_TFLITE = frozenset({"QUANTIZE", "DEQUANTIZE"})


@dataclass(frozen=True)
class HostRuntime:
    """The runtime, unit and thread count that timed a format's models on this host."""

    format: str
    runtime: str  # "LiteRT 2.3.0", "ONNX Runtime 1.32.0"
    unit: str  # "XNNPACK delegate (LiteRT's default)", "CPUExecutionProvider"
    providers: tuple[str, ...] = ()  # ONNX Runtime session providers
    threads: int = TIMING_THREADS
    cpu: str = ""
    note: str = ""  # why the unit differs from the profile's target

    @property
    def label(self) -> str:
        return f"{self.runtime} + {self.unit}, {self.threads} thread{'s' if self.threads != 1 else ''}, {self.cpu}"


def _cpu() -> str:
    from edgekit.cpuinfo import read_cpu

    cpu = read_cpu()
    return f"{cpu.model} ({cpu.machine}" + (f"; {cpu.emulation}: timings meaningless" if cpu.emulation else "") + ")"


def host_runtime(fmt: str, profile: HardwareProfile) -> HostRuntime:
    """What times ``fmt`` models for ``profile`` here, and how that differs from the profile's target."""
    if fmt == "tflite":
        target = profile.accelerators_for("tflite")
        note = "" if not target or target[0].id == "xnnpack" else (
            f"the profile's {target[0].name} does not run here: timed on LiteRT's default XNNPACK delegate instead")
        return HostRuntime("tflite", f"LiteRT {metadata.version('ai-edge-litert')}", "XNNPACK delegate (LiteRT's default)", (), TIMING_THREADS,
                           _cpu(), note)
    if fmt == "onnx":
        import onnxruntime as ort

        wanted = list(profile.formats.onnx.execution_providers) if profile.formats.onnx else ["CPUExecutionProvider"]
        available = set(ort.get_available_providers())
        ep = next((p for p in wanted if p in available), "CPUExecutionProvider")
        note = "" if ep == wanted[0] else f"{wanted[0]} is not in this host's ONNX Runtime build: timed on {ep}"
        providers = (ep,) if ep == "CPUExecutionProvider" else (ep, "CPUExecutionProvider")
        return HostRuntime("onnx", f"ONNX Runtime {ort.__version__}", ep, providers, TIMING_THREADS, _cpu(), note)
    return HostRuntime(fmt, fmt, "not run here", (), TIMING_THREADS, _cpu(), f"{fmt} models do not run on this host")


def load_for_timing(path: Path, host: HostRuntime) -> LocalModel:
    """The model loaded the way ``host`` times it (threads, delegate or execution providers)."""
    if host.format == "onnx" and host.providers != ("CPUExecutionProvider",):
        from edgekit.runtime.onnx import ONNXModel

        return ONNXModel(path, num_threads=host.threads, providers=host.providers)
    return load_model_file(path, host.format, num_threads=host.threads)


@dataclass(frozen=True)
class Speed:
    """A candidate's host latency against the float model's, timed in the same rounds."""

    p50_ms: float
    float_p50_ms: float
    ratio: float  # candidate / float, median of the per-round ratios
    rounds: int
    runs_per_round: int
    host: HostRuntime

    @property
    def speedup(self) -> float:
        return 1.0 / self.ratio if self.ratio > 0 else float("inf")

    @property
    def slower_than_float(self) -> bool:
        return self.ratio > 1.0 + DISPLACE_TOLERANCE

    @property
    def how(self) -> str:
        return f"batch 1, {self.rounds} rounds x {self.runs_per_round} calls interleaved with the float model, {self.host.label}"


def measure_speed(model: LocalModel, float_model: LocalModel, feeds: Mapping[str, np.ndarray], float_feeds: Mapping[str, np.ndarray],
                  runs: int, host: HostRuntime, rounds: int = TIMING_ROUNDS) -> Speed:
    """Time ``model`` and ``float_model`` in alternating rounds (see the module docstring)."""
    per = max(3, runs // rounds)
    latency_ms(model, feeds, 1, warmup=max(10, per))
    latency_ms(float_model, float_feeds, 1, warmup=max(10, per))
    cand, flt, ratios = [], [], []
    for r in range(rounds):
        if r % 2:
            c = float(np.median(latency_ms(model, feeds, per, warmup=0)))
            f = float(np.median(latency_ms(float_model, float_feeds, per, warmup=0)))
        else:
            f = float(np.median(latency_ms(float_model, float_feeds, per, warmup=0)))
            c = float(np.median(latency_ms(model, feeds, per, warmup=0)))
        cand.append(c)
        flt.append(f)
        ratios.append(c / f if f > 0 else float("inf"))
    return Speed(float(np.median(cand)), float(np.median(flt)), float(np.median(ratios)), rounds, per, host)


# --- the search's speed rules -------------------------------------------------------------------

def speed_class(recipe: Recipe) -> int:
    """0 uniform int8, 1 mixed (nodes kept in float: extra Q/DQ boundaries and float kernels), 2 int16 activations."""
    if recipe.activations == "int16":
        return 2
    if getattr(recipe.options, "xnnpack_islands", False):
        # Float islands where XNNPACK's int8 is missing or slow (TFLiteOptions.float_ops, float_narrow_convs): measured
        # faster than uniform int8 (MobileNetV3Small, the MNIST example; docs/decisions.md), so not ranked behind it.
        return 0
    if recipe.options.keep_sensitive or recipe.activations in ("float32", "float16"):
        return 1
    return 0


def graph_key(recipe: Recipe) -> tuple:
    """What shapes the quantized graph's ops and dtypes: recipes with equal keys differ only in values (ranges, weights).

    Per-channel vs per-tensor weights is a value difference too: the same ops with the same int8 dtypes,
    one scale per output channel or one per tensor (XNNPACK and ONNX Runtime run both on their int8 kernels).
    """
    opts = tuple((f.name, repr(getattr(recipe.options, f.name))) for f in fields(recipe.options) if f.name not in VALUE_ONLY_OPTIONS)
    return (type(recipe.options).__name__, recipe.weights, recipe.activations, opts)


def fidelity_sibling(recipe: Recipe, best: Recipe) -> bool:
    """``recipe`` builds ``best``'s graph (the same speed) with the int8 error corrected (bias correction): worth trying for fidelity.

    Top-1 flips on a selection split of a few hundred examples cannot tell a 0.7-point drop from a 0.3-point one; the
    SQNR of the outputs against the float model, over the same examples, moves by about 1 dB between halves of 250
    (measured on three depthwise CNNs, docs/decisions.md) and ranked the bias-corrected variants above plain per-channel
    on all three.
    """
    return recipe.name != best.name and graph_key(recipe) == graph_key(best) and bool(getattr(recipe.options, "bias_correction", False))


def displaces(ratio: float, best_ratio: float) -> bool:
    """A candidate within budget displaces the best so far only when more than DISPLACE_TOLERANCE faster (noise never flips a choice)."""
    return ratio * (1.0 + DISPLACE_TOLERANCE) < best_ratio


def early_stop_reason(recipe: Recipe, best: Recipe, best_ratio: float | None, timed: Mapping[tuple, tuple[str, float]]) -> str | None:
    """Why ``recipe`` need not be tried once ``best`` meets the budget at ``best_ratio`` x float latency (None: try it).

    - A slower speed class is never faster by construction: the same int8 graph plus float islands
      and their Q/DQ boundaries, or int16 tensors (twice the bytes; reference kernels where the
      accelerator has no 16x8 kernels).
    - The same class, when ``best`` is not slower than float: the same kind of graph cannot be more
      than the tolerance faster.
    - When ``best`` is slower than float, a same-class recipe that builds another graph (another
      quantizer, another ONNX layout, float islands for ops the delegate lacks) is still tried; one whose graph equals a timed one (``timed``:
      graph_key -> (recipe name, ratio)) is not, unless that graph was fast enough to displace ``best``
      (it missed the budget, and this recipe may meet it at the same speed).
    """
    cls, best_cls = speed_class(recipe), speed_class(best)
    if best_ratio is None:  # nothing timed (the format does not run here): the first within budget stands
        return f"{best.name} already meets the budget (early stop)"
    if cls > best_cls:
        return (f"early stop: {best.name} meets the budget, and {SPEED_CLASSES[cls]} graphs are never faster than "
                f"{SPEED_CLASSES[best_cls]} ones")
    if cls == best_cls and best_ratio <= 1.0 + DISPLACE_TOLERANCE:
        return (f"early stop: {best.name} meets the budget at {best_ratio:.2f}x float latency, and another "
                f"{SPEED_CLASSES[cls]} recipe cannot be more than {DISPLACE_TOLERANCE:.0%} faster by construction")
    same = timed.get(graph_key(recipe))
    if cls == best_cls and same is not None and not displaces(same[1], best_ratio):
        return (f"builds the same graph as {same[0]} (only ranges or weights differ), timed at {same[1]:.2f}x float: the same speed, "
                f"so it cannot displace {best.name} ({best_ratio:.2f}x)")
    return None


# --- why a candidate is slower than float -------------------------------------------------------

def _io_conversion_us(model: LocalModel, feeds_one: Mapping[str, np.ndarray], reps: int = 200) -> tuple[float, int] | None:
    """Microseconds per call that edgekit's runtime spends quantizing the inputs and dequantizing the outputs, and how many tensors."""
    from edgekit.runtime.quant import Affine

    ins = [(Affine.of(s), feeds_one[s.name]) for s in model.inputs if s.name in feeds_one]
    ins = [(a, x) for a, x in ins if a is not None]
    outs = [(Affine.of(s), s) for s in model.outputs]
    outs = [(a, np.zeros(tuple(max(1, d) for d in s.shape), a.dtype)) for a, s in outs if a is not None]
    if not ins and not outs:
        return None
    times = np.empty(reps)
    for i in range(reps):
        t0 = time.perf_counter()
        for a, x in ins:
            a.quantize(x)
        for a, q in outs:
            a.dequantize(q)
        times[i] = time.perf_counter() - t0
    return float(np.median(times[reps // 10:])) * 1e6, len(ins) + len(outs)  # median, the first tenth as warm-up


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _counts(items: Counter) -> str:
    return ", ".join(f"{op}" + (f" [{dt}]" if dt else "") + f" x{n}" for (op, dt), n in sorted(items.items(), key=lambda kv: (-kv[1], kv[0])))


def _tflite_facts(path: Path, float_path: Path) -> list[str]:
    from converters.coverage_runtime import litert_xnnpack_placement

    nodes, fnodes = litert_xnnpack_placement(path), litert_xnnpack_placement(float_path)
    facts = []
    off = Counter((n.op, n.dtype) for n in nodes if n.placement != "xnnpack")
    f_off = sum(1 for n in fnodes if n.placement != "xnnpack")
    if off:
        k = sum(off.values())
        facts.append(f"{k} of {_n(len(nodes), 'node')} {'is' if k == 1 else 'are'} off the XNNPACK delegate on this host and "
                     f"{'runs' if k == 1 else 'run'} on LiteRT's built-in kernels: {_counts(off)} (float model: {f_off} of {len(fnodes)} off)")
    wide = Counter((n.op, n.dtype) for n in nodes if n.dtype.startswith("int16"))
    if wide:
        k = sum(wide.values())
        facts.append(f"{_n(k, 'node')} {'takes' if k == 1 else 'take'} int16 activations, which the XNNPACK delegate has no kernels "
                     f"for (LiteRT's reference kernels run them): {_counts(wide)}")
    qdq = Counter((n.op, n.dtype) for n in nodes if n.op in _QDQ_TFLITE)
    if qdq:
        facts.append(f"{_n(sum(qdq.values()), 'QUANTIZE/DEQUANTIZE node')} inside the graph: {_counts(qdq)}")
    return facts


def _onnx_facts(path: Path, float_path: Path, host: HostRuntime) -> list[str]:
    from converters.coverage_runtime import ort_node_providers

    with tempfile.TemporaryDirectory(prefix="edgekit-speed-") as tmp:
        nodes = ort_node_providers(path, list(host.providers), Path(tmp) / "q")
        fnodes = ort_node_providers(float_path, list(host.providers), Path(tmp) / "f")
    facts = []
    qdq = Counter((n.op, n.dtype) for n in nodes if n.op in _QDQ_ONNX)
    if qdq:
        where = Counter(n.placement for n in nodes if n.op in _QDQ_ONNX)
        k = sum(qdq.values())
        facts.append(f"{_n(k, 'QuantizeLinear/DequantizeLinear node')} {'is' if k == 1 else 'are'} left after ONNX Runtime's QDQ fusion "
                     f"and run as separate kernels on {', '.join(f'{p} x{c}' for p, c in where.most_common())}: {_counts(qdq)} "
                     f"({len(nodes)} nodes in all vs {len(fnodes)} in the float model)")
    off = Counter((n.op, n.dtype) for n in nodes if n.placement != host.unit)
    if off and host.unit != "CPUExecutionProvider":
        facts.append(f"{_n(sum(off.values()), 'node')} ran off {host.unit}: {_counts(off)}")
    floats = Counter((n.op, n.dtype) for n in nodes if n.op not in _QDQ_ONNX and n.dtype in ("float32", "float16"))
    if floats:
        k = sum(floats.values())
        facts.append(f"{_n(k, 'compute node')} still {'runs' if k == 1 else 'run'} in float between Q/DQ pairs: {_counts(floats)}")
    return facts


def slowdown_reason(path: Path, float_path: Path, model: LocalModel, feeds_one: Mapping[str, np.ndarray], speed: Speed) -> str:
    """Why a candidate is slower than float on this host, from what the runtime reports (placement, dtypes, Q/DQ nodes) and timing."""
    host = speed.host
    facts: list[str] = []
    try:
        facts = _tflite_facts(path, float_path) if host.format == "tflite" else _onnx_facts(path, float_path, host) if host.format == "onnx" else []
    except Exception as e:  # noqa: BLE001 - the reason is a report, never a failed conversion
        facts = [f"the runtime could not report the placement ({type(e).__name__}: {str(e)[:120]})"]
    io = _io_conversion_us(model, feeds_one)
    if io is not None:
        us, k = io
        share = us / (speed.p50_ms * 1e3) if speed.p50_ms > 0 else 0.0
        facts.append(f"edgekit's runtime (de)quantizes {k} I/O tensor(s) per call: {us:.1f} us measured (median), about {share:.0%} "
                     f"of the {speed.p50_ms * 1e3:.1f} us call")
    head = f"{speed.ratio:.2f}x the float model's latency ({speed.p50_ms:.3f} vs {speed.float_p50_ms:.3f} ms, {host.label})"
    if not facts:
        return head + ": every node ran on the delegate with int8 kernels; these measurements do not explain the slowdown"
    return head + ": " + "; ".join(facts)

