"""The confidence output: a classifier's pre-softmax logits kept beside the app's output.

An INT8 softmax has a step of 1/256 and saturates: on the MNIST example most answers sit at
255/256, where no threshold can rank them. The logits before the softmax keep that resolution.
``with_confidence_output`` rewrites the float source model *before any converter runs*, so every
format gets the same two-output graph and no converter needs to know: output 0 stays the app's
(the same softmax of the same logits), output 1 is the logits.

- Keras: the output layer is a ``Softmax`` or ``Activation("softmax")`` layer (its input is
  the logits), or a layer with ``activation="softmax"`` (``Dense``, ``Conv2D``...), which is
  rebuilt with a linear activation and the same weights, followed by a ``Softmax`` layer.
- ONNX: the graph's first output is made by a ``Softmax`` node (through ``Identity`` nodes);
  its input gets an ``Identity`` to a new graph output ``logits``.
- PyTorch: the ExportedProgram's output is an ``aten.softmax`` node; its input is added to the
  graph's outputs and the program re-exported with ``torch.export``.
- SavedModel sources are left alone (said in the report): their softmax sits inside a traced
  function this code does not rewrite.

What each format makes of the extra output: ONNX QDQ keeps graph outputs float (the logits'
final DequantizeLinear stays), so it is float32; full-integer TFLite quantizes every output, so
it is int8 with its own scale (about 0.15 on the example: ~100 distinct top logits against a
handful of softmax levels). The runtime dequantizes either to float.

The manifest marks it without a new key (an agent older than this would refuse one: the manifest
forbids unknown keys): ``metrics["confidence_output"]`` holds the output's index, its note what
it is; ``edgekit.manifest.Manifest.confidence_output`` reads it back. Its cost is measured on the
packaged model against the same file with the output removed (``confidence_output.*`` metrics).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from converters.source import SourceModel
from edgekit.bundle import _size
from edgekit.errors import IncompatibleError, UsageError
from edgekit.manifest import CONFIDENCE_OUTPUT_METRIC, Metric

if TYPE_CHECKING:
    from converters.base import Converter, ModelFacts
    from converters.pipeline import RunContext
    from converters.search import Candidate

__all__ = ["CONFIDENCE_MODES", "ConfidencePlan", "app_output_first", "confidence_metrics", "with_confidence_output", "without_output"]

CONFIDENCE_MODES = ("auto", "logits", "none")


@dataclass(frozen=True)
class ConfidencePlan:
    """What ``--confidence-output`` did: the source output holding the logits (None when none was added) and why."""

    requested: str
    output: str | None
    app_output: str | None
    found: str
    note: str

    @property
    def added(self) -> bool:
        return self.output is not None

    def to_dict(self) -> dict:
        return {"requested": self.requested, "output": self.output, "app_output": self.app_output, "found": self.found, "note": self.note}


# --- the source rewrite ------------------------------------------------------------------------

def _is_softmax(fn: Any) -> bool:
    return getattr(fn, "__name__", "") == "softmax"


def _keras_logits(model: Any) -> tuple[Any, str] | str:
    """(a two-output model: [softmax, logits], what was split), or why not."""
    import keras

    if len(model.outputs) != 1:
        return f"the model has {len(model.outputs)} outputs"
    hist = getattr(model.outputs[0], "_keras_history", None)
    layer = hist[0] if hist else None
    if layer is None:
        return "the output's producing layer is not known (a subclassed model?)"
    if len(getattr(layer, "_inbound_nodes", ())) != 1:
        return f"layer '{layer.name}' is used more than once"
    axis = getattr(layer, "axis", -1)
    if isinstance(layer, keras.layers.Softmax) or (isinstance(layer, keras.layers.Activation) and _is_softmax(layer.activation)):
        if axis not in (-1, len(model.outputs[0].shape) - 1):
            return f"layer '{layer.name}' takes the softmax over axis {axis}, not the class axis"
        logits = layer.input
        found = f"{type(layer).__name__} layer '{layer.name}'"
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        return keras.Model(inputs, [model.outputs[0], logits], name=model.name), found
    if not _is_softmax(getattr(layer, "activation", None)):
        return f"the output layer '{layer.name}' ({type(layer).__name__}) has no softmax"
    cfg = layer.get_config()
    cfg["activation"] = "linear"
    cfg["name"] = f"{layer.name}_logits"
    linear = type(layer).from_config(cfg)
    logits = linear(layer.input)
    linear.set_weights(layer.get_weights())
    probs = keras.layers.Softmax(axis=-1, name=layer.name)(logits)  # the app's output: the same softmax of the same logits
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, [probs, logits], name=model.name), f"{type(layer).__name__} '{layer.name}' with activation softmax"


def _onnx_logits(path: Path, dest: Path) -> str | tuple[str, str]:
    """Write ``dest``: the ONNX model with its Softmax's input as a second graph output ``logits``; (found, name), or why not."""
    import onnx
    from onnx import helper

    m = onnx.load(str(path))
    g = m.graph
    if len(g.output) != 1:
        return f"the graph has {len(g.output)} outputs"
    producer = {o: n for n in g.node for o in n.output}
    name = g.output[0].name
    node = producer.get(name)
    while node is not None and node.op_type == "Identity":
        node = producer.get(node.input[0])
    if node is None or node.op_type != "Softmax":
        return f"the output '{name}' is made by {node.op_type if node is not None else 'no node'}, not a Softmax"
    rank = len(g.output[0].type.tensor_type.shape.dim)
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset < 13 and axis in (1, -1) and rank == 2:
        axis = -1  # before opset 13, Softmax flattened from ``axis`` (default 1): on [N, C] the same as the last axis
    if axis not in (-1, rank - 1):
        return f"Softmax node '{node.name}' runs over axis {axis}, not the class axis"
    used = {v.name for v in [*g.input, *g.output, *g.value_info]} | {o for n in g.node for o in n.output}
    out = "logits"
    i = 1
    while out in used:
        out, i = f"logits_{i}", i + 1
    g.node.append(helper.make_node("Identity", [node.input[0]], [out], name=f"{out}_output"))
    vi = onnx.ValueInfoProto()
    vi.CopyFrom(g.output[0])
    vi.name = out
    g.output.append(vi)
    onnx.checker.check_model(m)
    onnx.save(m, str(dest))
    return f"Softmax node '{node.name or node.output[0]}'", out


_TORCH_SOFTMAX = ("aten.softmax.int", "aten._softmax.default")


def _torch_logits(source: SourceModel) -> str | SourceModel:
    """The ExportedProgram re-exported with the softmax's input as a second output, as a SourceModel; or why not."""
    import torch

    from converters.torch_source import program_source

    gm = source.torch_program.module()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    results = out.args[0] if isinstance(out.args[0], (list, tuple)) else (out.args[0],)
    if len(results) != 1 or not hasattr(results[0], "target"):
        return f"the program has {len(results)} outputs"
    sm = results[0]
    if str(sm.target) not in _TORCH_SOFTMAX:
        return f"the output is made by {sm.target}, not a softmax"
    rank = len(source.outputs[0].shape)
    if sm.args[1] not in (-1, rank - 1):
        return f"the softmax runs over dim {sm.args[1]}, not the class axis"
    out.args = ((sm, sm.args[0]),)
    gm.graph._codegen = torch.fx.graph.CodeGen()  # flat tuple out instead of the one-output pytree
    gm.recompile()
    args = tuple(torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in source.inputs)
    try:
        program = torch.export.export(gm, args)
    except Exception as e:  # noqa: BLE001 - torch.export raises many types; the source is then converted as it is
        return f"torch.export could not re-export it with the logits ({type(e).__name__})"
    new = program_source(program, source.path, source.workdir, source.sha256)
    if new.input_names != source.input_names:
        return f"the re-exported program renames the inputs ({new.input_names})"
    return new


def with_confidence_output(source: SourceModel, mode: str, task: str) -> tuple[SourceModel, ConfidencePlan]:
    """The source with its logits as a second output when ``mode`` asks for it and the model allows (see the module)."""
    if mode not in CONFIDENCE_MODES:
        raise UsageError(f"--confidence-output '{mode}' is not one of {', '.join(CONFIDENCE_MODES)}",
                         "auto keeps the logits of classifiers whose softmax edgekit can find; none keeps the model's outputs as they are.")
    app = source.output_names[0] if source.outputs else None

    def unchanged(why: str) -> tuple[SourceModel, ConfidencePlan]:
        if mode == "logits":
            raise IncompatibleError(f"--confidence-output logits: {why}",
                                    "Use --confidence-output auto or none, or convert a .keras/.onnx classifier whose output is a softmax.")
        return source, ConfidencePlan(mode, None, app, "", why)

    if mode == "none":
        return source, ConfidencePlan(mode, None, app, "", "not added (--confidence-output none)")
    if task != "classification":
        return unchanged(f"task {task}: no class probabilities to keep the logits of")
    if len(source.outputs) != 1:
        return unchanged(f"the model has {len(source.outputs)} outputs")
    if source.kind == "keras" and source.keras_model is not None:
        from converters.source import import_tensorflow, keras_source

        got = _keras_logits(source.keras_model)
        if isinstance(got, str):
            return unchanged(got)
        model, found = got
        new = keras_source(model, source.path, source.workdir, import_tensorflow(), source.sha256)
        new.cache.update(source.cache)
    elif source.kind == "onnx" and source.onnx_path is not None:
        from converters.onnx_source import load_onnx_source

        sub = source.workdir / "confidence-output"
        sub.mkdir(parents=True, exist_ok=True)
        got = _onnx_logits(source.onnx_path, sub / "with_logits.onnx")
        if isinstance(got, str):
            return unchanged(got)
        found, _ = got
        new = load_onnx_source(sub / "with_logits.onnx", sub)
        new = dataclasses.replace(new, path=source.path, sha256=source.sha256, workdir=source.workdir, cache=dict(source.cache))
    elif source.kind == "torch" and source.torch_program is not None:
        got = _torch_logits(source)
        if isinstance(got, str):
            return unchanged(got)
        new, found = got, "aten softmax node"
        new.cache.update({k: v for k, v in source.cache.items() if k not in new.cache and not k.startswith("torch_onnx")})
    else:
        return unchanged(f"{source.kind} sources are not rewritten (the softmax sits inside a traced function); "
                         "convert the .keras or .onnx model to keep the logits")
    if new.output_names[0] != app or len(new.outputs) != 2:
        return unchanged(f"the rewritten model's outputs {new.output_names} do not keep '{app}' first")
    plan = ConfidencePlan(mode, new.output_names[1], app, found,
                          f"output '{new.output_names[1]}' holds the pre-softmax logits of '{app}' ({found} split at conversion)")
    return new, plan


# --- the cost, measured on the packaged model ----------------------------------------------------

def without_output(fmt: str, path: Path, output: str, dest_dir: Path) -> Path | None:
    """The same model file with graph output ``output`` removed (None for files this code cannot edit: .ort, Core ML)."""
    dest = dest_dir / f"without-confidence{path.suffix}"
    if fmt == "onnx" and path.suffix == ".onnx":
        import onnx

        m = onnx.load(str(path))
        keep = [o for o in m.graph.output if o.name != output]
        if len(keep) == len(m.graph.output):
            return None
        del m.graph.output[:]
        m.graph.output.extend(keep)
        onnx.save(m, str(dest))
        return dest
    if fmt == "tflite":
        from tensorflow.lite.tools import flatbuffer_utils as fb

        m = fb.read_model(str(path))
        sg = m.subgraphs[0]
        sig = m.signatureDefs[0] if m.signatureDefs else None
        index = next((t.tensorIndex for t in (sig.outputs if sig else []) if _tflite_output_name(t) == output), None)
        if index is None or len(m.subgraphs) != 1:
            return None
        sg.outputs = [i for i in sg.outputs if i != index]
        sig.outputs = [t for t in sig.outputs if t.tensorIndex != index]
        fb.write_model(m, str(dest))
        return dest
    return None


def _tflite_output_name(t: Any) -> str:
    return t.name.decode() if isinstance(t.name, bytes) else str(t.name)


def app_output_first(ctx: RunContext, fmt: str, path: Path) -> None:
    """Put the app's output first in the packaged file when the converter ordered the logits before it.

    TensorFlow's TFLite converter orders a graph's outputs as it emits them, and the logits are
    computed before the softmax; apps (and ``predict``) read output 0, so the file is rewritten with
    the outputs' order swapped (the graph itself is untouched). ONNX keeps the graph's order.
    """
    plan: ConfidencePlan | None = ctx.source.cache.get("confidence_plan")
    if plan is None or not plan.added or fmt != "tflite":
        return
    from tensorflow.lite.tools import flatbuffer_utils as fb

    m = fb.read_model(str(path))
    if len(m.subgraphs) != 1 or not m.signatureDefs:
        return
    sig = m.signatureDefs[0]
    app = next((t.tensorIndex for t in sig.outputs if _tflite_output_name(t) == plan.app_output), None)
    sg = m.subgraphs[0]
    if app is None or next(iter(sg.outputs)) == app:
        return
    sg.outputs = [app, *(i for i in sg.outputs if i != app)]
    sig.outputs = sorted(sig.outputs, key=lambda t: t.tensorIndex != app)
    fb.write_model(m, str(path))


def _interleaved_p50(calls: list[Any], runs: int, warmup: int = 5) -> list[float]:
    """p50 ms of each call, timed in turn within each round so load on the host falls on all of them alike."""
    for c in calls:
        for _ in range(warmup):
            c()
    times = np.empty((len(calls), runs))
    for r in range(runs):
        for i, c in enumerate(calls):
            t0 = time.perf_counter()
            c()
            times[i, r] = time.perf_counter() - t0
    return [float(np.percentile(t, 50) * 1e3) for t in times]


def confidence_metrics(ctx: RunContext, conv: Converter, cand: Candidate, facts: ModelFacts, on_host: str) -> tuple[dict[str, Metric], tuple[str, ...]]:
    """The manifest's marker of the confidence output and its measured cost, plus the report's note; empty without one."""
    from converters.search import align
    from edgekit.runtime import load_model_file

    plan: ConfidencePlan | None = ctx.source.cache.get("confidence_plan")
    if plan is None:
        return {}, ()
    if not plan.added:
        return {}, (f"confidence output: none ({plan.note})",)
    out_map = align(facts.outputs, ctx.source.outputs, "output")
    names = [s.name for s in facts.outputs]
    model_name = next(m for m, s in out_map.items() if s == plan.output)
    index = names.index(model_name)
    spec = facts.outputs[index]
    app_first = out_map[names[0]] == plan.app_output
    if not app_first:
        raise IncompatibleError(f"{conv.format}: the converted model puts output '{names[0]}' first, not the app's '{plan.app_output}'",
                                "Convert with --confidence-output none.")
    dtype = spec.dtype + (f", scale {spec.quantization.scale:.4g}" if spec.quantization is not None else "")
    metrics = {CONFIDENCE_OUTPUT_METRIC: Metric(
        value=float(index), unit="output index", status="measured",
        note=f"output '{model_name}' ({dtype}; the runtime returns it as float): the pre-softmax logits of the app's output "
             f"'{names[0]}', the router's confidence signal; {plan.found} split at conversion. predict() returns output 0.")}
    notes = [f"confidence output: '{model_name}' = the logits before '{names[0]}''s softmax ({dtype}), --confidence-output {plan.requested}"]
    size = _size(cand.path)
    work = ctx.work / f"confidence-{conv.format}-{cand.path.stem}"
    work.mkdir(parents=True, exist_ok=True)
    bare = without_output(conv.format, cand.path, model_name, work)
    if bare is None:
        why = f"the {cand.path.suffix} file cannot be edited here to compare"
        metrics["confidence_output.size_bytes_without"] = Metric(value=None, unit="B", status="not_measurable", note=why)
        notes.append(f"confidence output cost: not measured ({why})")
        return metrics, tuple(notes)
    size_without = _size(bare)
    metrics["confidence_output.size_bytes_without"] = Metric(
        value=float(size_without), unit="B", status="measured",
        note=f"the same model file without the logits output; with it: {size} B ({size - size_without:+d} B)")
    runs, _why = conv.runs_here()
    if not runs or cand.model is None or len(cand.model.inputs) != 1:
        notes.append(f"confidence output cost: {size - size_without:+d} B; latency not measured on this host")
        return metrics, tuple(notes)
    with_model = cand.model
    bare_model = load_model_file(bare, conv.format)
    x = next(iter(ctx.model_feeds(with_model, ctx.evalset.first).values()))
    feeds = {with_model.inputs[0].name: x}
    p_with, p_without, p_both = _interleaved_p50([lambda: with_model.predict(x), lambda: bare_model.predict(x), lambda: with_model.run(feeds)],
                                                 ctx.opts.latency_runs)
    metrics["confidence_output.latency_ms_p50_with"] = Metric(
        value=p_with, unit="ms", status="measured", note=f"predict() (the app's output), batch 1, {ctx.opts.latency_runs} runs interleaved, {on_host}")
    metrics["confidence_output.latency_ms_p50_without"] = Metric(
        value=p_without, unit="ms", status="measured", note="predict() on the same model without the logits output, same runs")
    metrics["confidence_output.latency_ms_p50_router"] = Metric(
        value=p_both, unit="ms", status="measured", note="run(): both outputs read and dequantized (the router's call), same runs")
    notes.append(f"confidence output cost {on_host}: {size - size_without:+d} B; predict() p50 {p_with:.4f} ms with vs {p_without:.4f} ms "
                 f"without; both outputs read {p_both:.4f} ms")
    return metrics, tuple(notes)
