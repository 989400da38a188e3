"""Graph-level measurements of ONNX models: quantization sensitivity per node, activation memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from converters.source import Feeds
from edgekit.nativelog import captured_output

__all__ = ["peak_live_bytes", "sensitive_nodes"]

# Ops whose int8 version is exact given its input (a copy, a max, a clamp the quantizer folds into the range).
_EXACT = {"Relu", "Clip", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Flatten", "MaxPool", "GlobalMaxPool", "Identity",
          "Gather", "Slice", "Split", "Pad", "DepthToSpace", "SpaceToDepth"}


def sensitive_nodes(float_path: Path, qdq_path: Path, feeds: Feeds, work: Path) -> list[str]:
    """Nodes of the float graph ranked from the one that adds the most quantization noise to the least.

    Both graphs run on the same inputs with every intermediate tensor as an output (ORT's QDQ
    debugger's graph rewrite); each float tensor's signal-to-quantization-noise ratio (SQNR) against its
    dequantized QDQ counterpart is measured, and a node's score is the SQNR its output loses against its
    noisiest input. Exact ops are not ranked: their drop counts for the node that produced their input. Streamed: one example at a
    time, only the running signal and noise sums are kept (ORT's ``collect_activations`` holds
    every intermediate tensor of every example, which grew past 3.7 GB on ResNet-50 with 8 samples).
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.qdq_loss_debug import modify_model_output_intermediate_tensors
    from onnxruntime.quantization.quant_utils import DEQUANT_OUTPUT_SUFFIX, QUANT_INPUT_SUFFIX

    aug_f, aug_q = work / "sens-float.onnx", work / "sens-qdq.onnx"
    with captured_output():
        modify_model_output_intermediate_tensors(str(float_path), str(aug_f))
        modify_model_output_intermediate_tensors(str(qdq_path), str(aug_q))
        sf = ort.InferenceSession(str(aug_f), providers=["CPUExecutionProvider"])
        sq = ort.InferenceSession(str(aug_q), providers=["CPUExecutionProvider"])
    f_names = [o.name for o in sf.get_outputs()]
    q_names = [o.name for o in sq.get_outputs()]
    saved = "_ReshapedSavedOutput"  # the debugger's flattened copy of each tensor
    f_key = {n.removesuffix(saved): n for n in f_names}
    q_key = {n.removesuffix(saved): n for n in q_names}
    pairs: dict[str, str] = {}  # float tensor -> the QDQ graph's dequantized version of it
    qset = set(q_key)
    for t in q_key:
        for suffix in (DEQUANT_OUTPUT_SUFFIX + "_1", DEQUANT_OUTPUT_SUFFIX):
            if t.endswith(suffix):
                pairs.setdefault(t[: -len(suffix)], t)
                break
        else:
            if t.endswith(QUANT_INPUT_SUFFIX) and t[: -len(QUANT_INPUT_SUFFIX)] in qset:
                pairs.setdefault(t[: -len(QUANT_INPUT_SUFFIX)], t[: -len(QUANT_INPUT_SUFFIX)])
    pairs = {k: v for k, v in pairs.items() if k in f_key}
    signal = dict.fromkeys(pairs, 0.0)
    noise = dict.fromkeys(pairs, 0.0)
    f_dtypes = {v.name: v.type for v in sf.get_inputs()}
    n = len(next(iter(feeds.values())))
    for i in range(n):
        one = {k: v[i : i + 1] for k, v in feeds.items()}
        fo = dict(zip(f_names, sf.run(f_names, {k: one[k] for k in f_dtypes})))
        qo = dict(zip(q_names, sq.run(q_names, {v.name: one[v.name] for v in sq.get_inputs()})))
        for t, qt in pairs.items():
            a, b = np.asarray(fo[f_key[t]], np.float64), np.asarray(qo[q_key[qt]], np.float64)
            if a.shape != b.shape:
                continue
            signal[t] += float((a * a).sum())
            noise[t] += float(((a - b) ** 2).sum())
        del fo, qo
    nodes = onnx.load(str(float_path), load_external_data=False).graph.node
    producer = {o: nd for nd in nodes for o in nd.output}
    sqnr = {t: (10 * np.log10(signal[t] / noise[t]) if noise[t] > 0 and signal[t] > 0 else np.inf) for t in pairs}
    # Noise accumulates downstream, so a tensor's own SQNR ranks by depth. Rank each node by the noise it adds: the
    # SQNR drop from its noisiest input to its output; an exact op (ReLU, reshapes, max-pool) passes its drop to
    # the node that produced its input (the quantizer folds a ReLU into the Conv before it).
    added: dict[str, float] = {}
    for nd in nodes:
        out = nd.output[0] if nd.output else None
        if out not in sqnr or not np.isfinite(sqnr[out]):
            continue
        ins = [sqnr.get(i, np.inf) for i in nd.input if i in sqnr or i not in producer]
        drop = min(ins, default=np.inf) - sqnr[out]
        owner = nd
        while owner.op_type in _EXACT and owner.input and owner.input[0] in producer:
            owner = producer[owner.input[0]]
        if owner.op_type in _EXACT:
            continue  # an exact op fed by a graph input
        added[owner.name] = added.get(owner.name, 0.0) + (drop if np.isfinite(drop) else 100.0 - sqnr[out])
    return [n for n, _ in sorted(added.items(), key=lambda kv: -kv[1])]


def peak_live_bytes(g) -> int:
    """Largest sum of tensor bytes alive at once when the graph's nodes run in order (inputs included, initializers not)."""
    import onnx

    inits = {i.name for i in g.initializer}
    sizes: dict[str, int] = {}
    for v in [*g.value_info, *g.input, *g.output]:
        t = v.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim]
        if v.name not in inits and all(dims) and t.elem_type:
            sizes[v.name] = int(np.prod(dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
    last_use: dict[str, int] = {}
    for idx, n in enumerate(g.node):
        for i in n.input:
            last_use[i] = idx
    keep = {o.name for o in g.output}
    live = sum(sizes.get(v.name, 0) for v in g.input)
    peak = live
    for idx, n in enumerate(g.node):
        live += sum(sizes.get(o, 0) for o in n.output)
        peak = max(peak, live)
        for name in {*n.input, *n.output}:
            if name in sizes and name not in keep and last_use.get(name, -1) <= idx:
                live -= sizes[name]
                sizes[name] = 0  # freed once
    return peak
