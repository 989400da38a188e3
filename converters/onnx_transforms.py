"""Transforms on ONNX graphs that help INT8 keep the float model's accuracy and speed.

- ``equalize_cross_layer``: cross-layer equalization (Nagel et al. 2019) of Conv -> [ReLU, pooling] -> Conv/Gemm
  pairs on the float graph, depthwise -> pointwise included. The float function is unchanged; the channel
  ranges of both layers become equal, which is what per-tensor weights (and the activation between) need.
- ``correct_bias``: empirical bias correction on the QDQ graph, layer by layer in execution order: the mean
  per-channel difference between each Conv/Gemm's float output and its QDQ output on calibration data (the
  QDQ graph's inputs to that layer carrying every upstream quantization error and upstream correction) is
  folded into that layer's bias; the int32 bias initializer of a quantized layer is changed in place, so the
  graph keeps the layout ONNX Runtime fuses. NNCF's BiasCorrection does the same on its own graphs;
  its FastBiasCorrection feeds each layer the float input mean instead (weight error only).
- ``dequantize_head``: the graph outputs leave the last layer's int32 accumulator as float instead of being
  requantized to 8 bits (which ties the top classes of low-margin inputs).
- ``global_average_pools``: a ReduceMean over every spatial axis (how tf2onnx and torch.onnx write global
  average pooling, squeeze-excite blocks included) becomes GlobalAveragePool, the same values: ONNX Runtime
  has an int8 kernel for that one (QLinearGlobalAveragePool) and none for ReduceMean, which otherwise runs in
  float between a DequantizeLinear and a QuantizeLinear.

The math (ranges, scales, shifts) is ``converters.quant_math``; this module walks the graphs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.quant_math import channel_ranges, equalization_scales, measured_output_shift
from converters.source import Feeds

__all__ = ["BiasCorrection", "correct_bias", "dequantize_head", "equalize_cross_layer", "global_average_pools",
           "global_average_pools_in_file"]

# Ops between two layers through which a positive per-channel scale passes unchanged (f(s x) = s f(x), s > 0).
_HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Identity", "Dropout"}
# Shape ops allowed only after a global pool (the channel axis then becomes the feature axis of a Gemm/MatMul).
_FLATTENING = {"Squeeze", "Flatten", "Reshape"}


def _attr(node, name: str, default):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


@dataclass(frozen=True)
class _Layer:
    """One weighted node as cross-layer equalization sees it."""

    node: object
    weight: str
    bias: str | None
    out_axis: int  # weight axis of the output channels
    in_axis: int  # weight axis of the input channels (depthwise Conv: 0, its channel is both)


def _layer(node, inits: dict) -> _Layer | None:
    if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
        w = inits[node.input[1]]
        if len(w.dims) != 4:
            return None
        group = int(_attr(node, "group", 1))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        if group == 1:
            return _Layer(node, node.input[1], bias, 0, 1)
        if w.dims[1] == 1 and w.dims[0] == group:  # depthwise, multiplier 1
            return _Layer(node, node.input[1], bias, 0, 0)
        return None
    if node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] in inits and not _attr(node, "transA", 0):
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        trans_b = int(_attr(node, "transB", 0))
        return _Layer(node, node.input[1], bias, 0 if trans_b else 1, 1 if trans_b else 0)
    if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
        return _Layer(node, node.input[1], None, 1, 0)
    return None


def _pairs(graph) -> list[tuple[_Layer, _Layer]]:
    """(first, second) layers joined by a single-consumer chain of positive-homogeneous ops."""
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    pairs = []
    for n in graph.node:
        if n.op_type != "Conv" or (first := _layer(n, inits)) is None or uses.get(first.weight, 0) != 1:
            continue
        if first.bias is not None and uses.get(first.bias, 0) != 1:
            continue
        tensor, pooled = n.output[0], False
        while True:
            nxt = consumers.get(tensor, [])
            if len(nxt) != 1 or tensor in outputs:
                break
            (c,) = nxt
            if c.op_type in _HOMOGENEOUS and c.input[0] == tensor:
                pooled |= c.op_type.startswith("Global")
                tensor = c.output[0]
                continue
            if c.op_type in _FLATTENING and pooled and c.input[0] == tensor:
                tensor = c.output[0]
                continue
            second = _layer(c, inits)
            if second is not None and c.input[0] == tensor and uses.get(second.weight, 0) == 1:
                pairs.append((first, second))
            break
    return pairs


def equalize_cross_layer(model, iterations: int = 20, tolerance: float = 1e-4) -> int:
    """Equalize every eligible layer pair of ``model`` (an onnx ModelProto, changed in place); returns the pair count.

    Repeated until no scale moves by more than ``tolerance`` (a depthwise layer sits in two pairs).
    """
    from onnx import numpy_helper

    g = model.graph
    pairs = _pairs(g)
    if not pairs:
        return 0
    arrays = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in g.initializer}
    for _ in range(iterations):
        moved = 0.0
        for a, b in pairs:
            wa, wb = arrays[a.weight], arrays[b.weight]
            s = equalization_scales(channel_ranges(wa, a.out_axis), channel_ranges(wb, b.in_axis))
            if s.shape[0] != wa.shape[a.out_axis] or wb.shape[b.in_axis] != s.shape[0]:
                continue
            shape_a = [1] * wa.ndim
            shape_a[a.out_axis] = -1
            shape_b = [1] * wb.ndim
            shape_b[b.in_axis] = -1
            arrays[a.weight] = wa / s.reshape(shape_a)
            if a.bias is not None:
                arrays[a.bias] = arrays[a.bias] / s
            arrays[b.weight] = wb * s.reshape(shape_b)
            moved = max(moved, float(np.abs(np.log(s)).max()))
        if moved < tolerance:
            break
    touched = {x for a, b in pairs for x in (a.weight, a.bias, b.weight) if x}
    for i, init in enumerate(g.initializer):
        if init.name in touched:
            g.initializer[i].CopyFrom(numpy_helper.from_array(arrays[init.name].astype(numpy_helper.to_array(init).dtype), init.name))
    return len(pairs)


@dataclass(frozen=True)
class BiasCorrection:
    """What ``correct_bias`` did: layers corrected, samples used, and the largest shift per layer (float units)."""

    layers: tuple[tuple[str, float], ...]
    skipped: tuple[str, ...]  # quantized Conv/Gemm nodes without a bias to correct
    samples: int
    seconds: float


def _bias_source(node, producers: dict, inits: dict):
    """("int32", initializer, scale) for a DequantizeLinear-fed int32 bias, ("float", initializer, None), or None."""
    from onnx import numpy_helper

    if len(node.input) < 3 or not node.input[2]:
        return None
    b = node.input[2]
    if b in inits:
        return ("float", b, None)
    p = producers.get(b)
    if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in inits and inits[p.input[0]].data_type == 6:  # INT32
        return ("int32", p.input[0], numpy_helper.to_array(inits[p.input[1]]).astype(np.float64))
    return None


def correct_bias(float_path: Path, qdq_model, feeds: Feeds, work: Path, max_samples: int = 128, budget_s: float = 60.0) -> BiasCorrection:
    """Empirical bias correction of ``qdq_model`` (onnx ModelProto quantized from ``float_path``, changed in place).

    Every Conv/Gemm whose weights the QDQ graph dequantizes and which has a bias is corrected, in graph order
    (sequentially: each layer sees the upstream layers already corrected). The biases become inputs of one
    probe session, so a step costs one pass over the samples, not a new session. Samples are capped so
    the passes fit ``budget_s`` (at least 8).
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    t0 = time.perf_counter()
    g = qdq_model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    float_model = onnx.load(str(float_path), load_external_data=False)
    float_nodes = {n.name: n for n in float_model.graph.node}
    targets, skipped = [], []
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm") or n.name not in float_nodes or float_nodes[n.name].op_type != n.op_type:
            continue
        wp = producers.get(n.input[1])
        if wp is None or wp.op_type != "DequantizeLinear":
            continue  # left in float: nothing to correct
        src = _bias_source(n, producers, inits)
        if src is None:
            skipped.append(n.name)
            continue
        targets.append((n, float_nodes[n.name].output[0], src))
    if not targets:
        return BiasCorrection((), tuple(skipped), 0, time.perf_counter() - t0)

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # Float reference: each target's output, per-channel means over the samples.
    probe_f = onnx.ModelProto()
    probe_f.CopyFrom(float_model)
    have = {o.name for o in probe_f.graph.output}
    for _, f_out, _ in targets:
        if f_out not in have:
            probe_f.graph.output.append(helper.make_tensor_value_info(f_out, TensorProto.FLOAT, None))
    work.mkdir(parents=True, exist_ok=True)
    f_path, q_path = work / "bc-float.onnx", work / "bc-qdq.onnx"
    onnx.save(probe_f, str(f_path))
    sf = ort.InferenceSession(str(f_path), so, providers=["CPUExecutionProvider"])
    f_inputs = [i.name for i in sf.get_inputs()]

    # QDQ probe: the targets' outputs as graph outputs, their biases as graph inputs.
    probe_q = onnx.ModelProto()
    probe_q.CopyFrom(qdq_model)
    pg = probe_q.graph
    bias_names = {src[1] for _, _, src in targets}
    bias = {name: numpy_helper.to_array(inits[name]).copy() for name in bias_names}
    keep = [i for i in pg.initializer if i.name not in bias_names]
    del pg.initializer[:]
    pg.initializer.extend(keep)
    for name, arr in bias.items():
        pg.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape)))
    have = {o.name for o in pg.output}
    for n, _, _ in targets:
        if n.output[0] not in have:
            pg.output.append(helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None))
    onnx.save(probe_q, str(q_path))
    sq = ort.InferenceSession(str(q_path), so, providers=["CPUExecutionProvider"])
    q_inputs = [i.name for i in sq.get_inputs() if i.name not in bias_names]

    n_all = len(next(iter(feeds.values())))
    one = {k: v[:1] for k, v in feeds.items()}
    t = time.perf_counter()
    sq.run([targets[-1][0].output[0]], {**{k: one[k] for k in q_inputs}, **bias})
    per_run = max(time.perf_counter() - t, 1e-5)
    n = int(min(n_all, max_samples, max(8, budget_s / (per_run * (len(targets) + 1)))))
    samples = [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(n)]

    f_names = [f_out for _, f_out, _ in targets]
    f_sum = {name: None for name in f_names}
    for s in samples:
        for name, y in zip(f_names, sf.run(f_names, {k: s[k] for k in f_inputs})):
            y = np.asarray(y, np.float64)
            f_sum[name] = y if f_sum[name] is None else f_sum[name] + y
    done = []
    for node, f_out, (kind, name, scale) in targets:
        q_out = node.output[0]
        q_sum = None
        for s in samples:
            (y,) = sq.run([q_out], {**{k: s[k] for k in q_inputs}, **bias})
            y = np.asarray(y, np.float64)
            q_sum = y if q_sum is None else q_sum + y
        shift = measured_output_shift(f_sum[f_out][None] / n, q_sum[None] / n, axis=2)  # (1, batch, C, ...) -> per C
        if kind == "int32":
            step = np.rint(shift / np.where(scale > 0, scale, 1.0))
            bias[name] = np.clip(bias[name].astype(np.int64) - step.astype(np.int64), -(2**31), 2**31 - 1).astype(np.int32)
        else:
            bias[name] = (bias[name] - shift).astype(bias[name].dtype)
        done.append((node.name, float(np.abs(shift).max())))
    for i, init in enumerate(g.initializer):
        if init.name in bias:
            g.initializer[i].CopyFrom(numpy_helper.from_array(bias[init.name], init.name))
    return BiasCorrection(tuple(done), tuple(skipped), n, time.perf_counter() - t0)


# Float ops a graph output may pass through back to the layer that computed it (cheap, and exact in float).
_HEAD_PASS = {"Softmax", "LogSoftmax", "Sigmoid", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def dequantize_head(model) -> list[str]:
    """Remove the QuantizeLinear/DequantizeLinear pairs between each graph output and the layer that computes it.

    Requantizing logits (or probabilities) to 8 bits ties the top classes of low-margin inputs (seen: 5.7% of
    1,000 MNIST images on a depthwise CNN, each a coin flip); without the pair ONNX Runtime fuses the head as
    QGemm / MatMulIntegerToFloat with a float output from the int32 accumulator, and the Softmax after it runs
    in float on 10 values. Returns the names of the QuantizeLinear nodes removed. ``model`` changes in place.
    """
    g = model.graph
    removed: list[str] = []
    outputs = {o.name for o in g.output}

    def maps():
        producer = {o: n for n in g.node for o in n.output}
        consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        return producer, consumers

    for out in [o.name for o in g.output]:
        t = out
        while True:
            producer, consumers = maps()
            p = producer.get(t)
            if p is None:
                break
            if p.op_type in _HEAD_PASS:
                t = p.input[0]
                continue
            if p.op_type != "DequantizeLinear":
                break
            q = producer.get(p.input[0])
            if q is None or q.op_type != "QuantizeLinear" or len(consumers.get(q.output[0], [])) != 1:
                break
            src = q.input[0]
            if len(consumers.get(src, [])) != 1 or src in outputs:
                break  # the float tensor feeds something else too
            if t in outputs:  # keep the graph output's name: the layer now writes it directly
                maker = producer[src]
                maker.output[list(maker.output).index(src)] = t
                new = t
            else:
                for c in consumers.get(t, []):
                    for k, name in enumerate(c.input):
                        if name == t:
                            c.input[k] = src
                new = src
            g.node.remove(p)
            g.node.remove(q)
            removed.append(q.name)
            t = new
    return removed


def global_average_pools(model) -> int:
    """Rewrite, in place, each ReduceMean over all spatial axes of an N, C, spatial... tensor as GlobalAveragePool; the count.

    keepdims=0 adds a Flatten (N, C, 1, 1 -> N, C, exactly ReduceMean's shape). Axes come from the attribute
    (opset < 18) or a constant input (opset 18+); a ReduceMean whose rank or axes are not known is left alone.
    """
    import onnx
    from onnx import helper, numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)  # GlobalAveragePool's types
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*inferred.graph.value_info, *inferred.graph.input)
             if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape") and v.type.tensor_type.elem_type in floats}
    inits = {i.name: i for i in model.graph.initializer}
    nodes, count = [], 0
    for n in model.graph.node:
        rank = ranks.get(n.input[0]) if n.op_type == "ReduceMean" and n.domain in ("", "ai.onnx") else None
        axes = _attr(n, "axes", None)
        if rank is not None and axes is None and len(n.input) > 1 and n.input[1] in inits:
            axes = numpy_helper.to_array(inits[n.input[1]]).tolist()
        if rank is None or rank < 3 or axes is None or sorted(a % rank for a in axes) != list(range(2, rank)):
            nodes.append(n)
            continue
        count += 1
        if _attr(n, "keepdims", 1):
            nodes.append(helper.make_node("GlobalAveragePool", [n.input[0]], list(n.output), name=n.name))
        else:
            pooled = f"{n.output[0]}__global_pool"
            nodes += [helper.make_node("GlobalAveragePool", [n.input[0]], [pooled], name=n.name),
                      helper.make_node("Flatten", [pooled], list(n.output), name=f"{n.name}__flatten", axis=1)]
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return count


def global_average_pools_in_file(path: Path) -> int:
    """``global_average_pools`` on an ONNX file in place (external weights stay where they are); the count."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    n = global_average_pools(m)
    if n:
        onnx.save(m, str(path))
    return n
