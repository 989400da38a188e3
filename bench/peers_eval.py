"""The peers benchmark's one evaluator for every side's file (bench/quantization_peers.py): predictions, the paired
accuracy drop, interleaved latency, sizes, and which dtype each conv / fully-connected node takes.

LiteRT (``ai_edge_litert``, XNNPACK, 1 thread) for .tflite, ONNX Runtime (CPU EP, 1 thread) for .onnx.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from bench.harness import median, quiet

__all__ = ["activation_dtypes", "acts_label", "latency", "paired_drop", "predict", "size_bytes"]


def _tflite_interp(path: Path):
    from ai_edge_litert.interpreter import Interpreter

    with quiet():
        it = Interpreter(model_path=str(path), num_threads=1)
        it.allocate_tensors()
    return it


def _tflite_feed(it, x: np.ndarray) -> np.ndarray:
    d = it.get_input_details()[0]
    if d["dtype"] in (np.int8, np.uint8, np.int16):
        scale, zp = d["quantization"]
        info = np.iinfo(d["dtype"])
        return np.clip(np.round(x / scale) + zp, info.min, info.max).astype(d["dtype"])
    return x.astype(d["dtype"])


def _ort_session(path: Path):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = 1, 1, 3
    return ort.InferenceSession(str(path), sess_options=o, providers=["CPUExecutionProvider"])


def predict(path: Path, x: np.ndarray) -> np.ndarray:
    """Top-1 class per image, batch 1, with the runtime the file is for."""
    out = np.empty(len(x), dtype=np.int64)
    if path.suffix == ".tflite":
        it = _tflite_interp(path)
        din, dout = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
        feed = _tflite_feed(it, x)
        for i in range(len(x)):
            it.set_tensor(din, feed[i : i + 1])
            it.invoke()
            out[i] = int(it.get_tensor(dout).argmax())
        return out
    s = _ort_session(path)
    name = s.get_inputs()[0].name
    for i in range(len(x)):
        out[i] = int(s.run(None, {name: x[i : i + 1]})[0].argmax())
    return out


def paired_drop(y: np.ndarray, pred_float: np.ndarray, pred_int8: np.ndarray) -> tuple[float, float, float]:
    """Accuracy drop in points and its 95% CI (Agresti-Min adjusted Wald interval for a paired difference).

    b: images the float model gets right and the int8 model wrong, c: the reverse; the drop is
    (b - c) / n. The interval adds 0.5 to each cell of the 2x2 table, so it does not collapse to
    zero width when no image changes.
    """
    n = len(y)
    b = int(((pred_float == y) & (pred_int8 != y)).sum())
    c = int(((pred_float != y) & (pred_int8 == y)).sum())
    pb, pc = (b + 0.5) / (n + 2), (c + 0.5) / (n + 2)
    half = 1.96 * math.sqrt(max(pb + pc - (pb - pc) ** 2, 0.0) / (n + 2))
    mid = pb - pc
    return (b - c) / n * 100, (mid - half) * 100, (mid + half) * 100


def latency(paths: dict[str, Path], x_one: np.ndarray, rounds: int) -> dict[str, float]:
    """Median per-run ms of each file (batch 1, 1 thread), ``rounds`` interleaved rounds, each the median of a block."""
    runners = {}
    for key, p in paths.items():
        if p.suffix == ".tflite":
            it = _tflite_interp(p)
            it.set_tensor(it.get_input_details()[0]["index"], _tflite_feed(it, x_one))
            runners[key] = it.invoke
        else:
            s = _ort_session(p)
            feed = {s.get_inputs()[0].name: x_one}
            runners[key] = lambda s=s, feed=feed: s.run(None, feed)
    blocks = {}
    for key, run in runners.items():
        for _ in range(5):
            run()
        t0 = time.perf_counter()
        run()
        blocks[key] = max(5, min(300, int(0.15 / max(time.perf_counter() - t0, 1e-6))))
    per_round: dict[str, list[float]] = {k: [] for k in runners}
    keys = list(runners)
    for r in range(rounds):
        for k in keys if r % 2 == 0 else reversed(keys):
            run, times = runners[k], []
            for _ in range(blocks[k]):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            per_round[k].append(float(np.median(times)) * 1e3)
    return {k: median(v) for k, v in per_round.items()}


def size_bytes(path: Path) -> int:
    """The model file plus any external-data file saved beside it (name starting with the model's)."""
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.iterdir()
                                     if p != path and p.name.startswith(path.stem) and not p.name.endswith(".json") and p.is_file()
                                     and p.suffix not in (".npz", ".tflite", ".onnx", ".ort"))


_GRID_KEEPING = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Relu", "Clip", "Pad")


def activation_dtypes(path: Path) -> dict[str, int]:
    """Input dtype of each conv / fully-connected / matmul node of the file, counted."""
    counts: dict[str, int] = {}
    if path.suffix == ".tflite":
        from tensorflow.lite.python import schema_py_generated as schema

        m = schema.Model.GetRootAsModel(path.read_bytes(), 0)
        names = {v: k for k, v in vars(schema.BuiltinOperator).items() if isinstance(v, int)}
        tnames = {v: k.lower() for k, v in vars(schema.TensorType).items() if isinstance(v, int)}
        for s in range(m.SubgraphsLength()):
            g = m.Subgraphs(s)
            for i in range(g.OperatorsLength()):
                op = g.Operators(i)
                code = m.OperatorCodes(op.OpcodeIndex())
                name = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "?")
                if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL"):
                    t = tnames[g.Tensors(op.Inputs(0)).Type()]
                    counts[t] = counts.get(t, 0) + 1
        return counts
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type in ("Conv", "Gemm", "MatMul"):
            src = producer.get(n.input[0])
            # values still on the int8 grid when they pass through data-movement ops after a DequantizeLinear
            while src is not None and src.op_type in _GRID_KEEPING and src.input:
                src = producer.get(src.input[0])
            w = producer.get(n.input[1]) if len(n.input) > 1 else None
            while w is not None and w.op_type in ("Transpose", "Reshape", "Identity") and w.input:
                w = producer.get(w.input[0])
            if w is None or w.op_type != "DequantizeLinear":
                t = "float32"  # float weights: the node computes in float whatever its input
            elif src is not None and src.op_type == "DequantizeLinear":
                t = inits.get(src.input[2], "?") if len(src.input) > 2 else "uint8"
            else:
                t = "float32"
        elif n.op_type in ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"):
            t = inits.get(n.input[2], "?") if n.op_type.startswith("QLinear") else "int8/uint8 (dynamic)"
        else:
            continue
        counts[t] = counts.get(t, 0) + 1
    return counts


def acts_label(counts: dict[str, int]) -> tuple[str, bool]:
    """('int8', True) when every compute node takes 8-bit integers; otherwise the mix, False."""
    if not counts:
        return "-", False
    eight = {"int8", "uint8"}
    if set(counts) <= eight:
        return "/".join(sorted(counts)), True
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), False
