"""Op placement as the runtimes on this host report it (LiteRT XNNPACK, ONNX Runtime EPs).

Where a runtime runs here, the coverage table comes from the runtime itself, never from a
static list: LiteRT's XNNPACK delegate replaces the nodes it takes with DELEGATE nodes
(``Interpreter._get_ops_details()`` lists the original nodes followed by one DELEGATE node
per partition, whose inputs/outputs are the partition's boundary), and ONNX Runtime's session
profile names the execution provider that ran each node (``SessionOptions.enable_profiling``).
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["NodePlacement", "litert_nodes", "onnx_nodes", "litert_xnnpack_placement", "ort_float_ops", "ort_node_providers", "xnnpack_host_label"]


@dataclass(frozen=True)
class NodePlacement:
    """One node of the model as the runtime ran it."""

    index: int
    op: str
    dtype: str
    placement: str  # the runtime's unit: "xnnpack", "CPUExecutionProvider", or "cpu" (built-in kernels)
    shape: tuple[int, ...] = ()  # the first input's shape, where the reader knows it
    axes: tuple[int, ...] | None = None  # reduction axes (constant second input of MEAN/SUM/REDUCE_*)


def _dtype_label(types: list) -> str:
    """The node's dtype: its first input's, with ``int16x8`` for int16 activations on int8 weights."""
    names = [np.dtype(t).name for t in types]
    if not names:
        return ""
    if names[0] == "int16":
        return "int16x8" if "int8" in names[1:] else "int16"
    return names[0]


def _interpreter(model: Path, delegates: bool):  # noqa: ANN202 - LiteRT's Interpreter, imported lazily
    from ai_edge_litert import interpreter as litert

    kind = litert.OpResolverType.AUTO if delegates else litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = litert.Interpreter(model_path=str(model), experimental_op_resolver_type=kind)
    it.allocate_tensors()
    return it


def xnnpack_host_label() -> str:
    """Where an XNNPACK measurement was made, e.g. 'x86_64 LiteRT 2.3.0 XNNPACK'."""
    from importlib.metadata import version

    return f"{platform.machine()} LiteRT {version('ai-edge-litert')} XNNPACK"


def litert_nodes(model: Path) -> list[NodePlacement]:
    """The model's nodes with their dtypes, read by LiteRT without any delegate (placement 'cpu')."""
    it = _interpreter(model, delegates=False)
    out = []
    for d in it._get_ops_details():
        ins = [int(t) for t in d["inputs"] if t >= 0]
        shape = tuple(int(x) for x in it._get_tensor_details(ins[0], 0)["shape"]) if ins else ()
        axes = None
        if d["op_name"] in ("MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_PROD") and len(ins) > 1:
            try:
                axes = tuple(int(a) for a in np.atleast_1d(it.get_tensor(ins[1])))
            except ValueError:  # not a constant LiteRT can read: leave the axes unknown
                axes = None
        out.append(NodePlacement(d["index"], d["op_name"], _dtype_label(d["operand_types"]), "cpu", shape, axes))
    return out


def litert_xnnpack_placement(model: Path) -> list[NodePlacement]:
    """Which nodes LiteRT's default XNNPACK delegate took on this host, node by node.

    The interpreter built with the default delegate appends one DELEGATE node per partition
    after the model's own nodes. A model node belongs to a partition when it lies between the
    partition's outputs and its inputs: walking producers back from the DELEGATE node's outputs,
    stopping at its inputs, reaches exactly the replaced nodes (a node the delegate left produces a
    tensor that is an input of the partition, so the walk stops there).
    """
    it = _interpreter(model, delegates=True)
    details = it._get_ops_details()
    own = [d for d in details if d["op_name"] != "DELEGATE"]
    producer = {int(t): d["index"] for d in own for t in d["outputs"] if t >= 0}
    taken: set[int] = set()
    for part in (d for d in details if d["op_name"] == "DELEGATE"):
        boundary = {int(t) for t in part["inputs"]}
        todo = [int(t) for t in part["outputs"]]
        while todo:
            t = todo.pop()
            node = producer.get(t)
            if t in boundary or node is None or node in taken:
                continue
            taken.add(node)
            todo.extend(int(x) for x in details[node]["inputs"] if x >= 0)
    return [NodePlacement(d["index"], d["op_name"], _dtype_label(d["operand_types"]),
                          "xnnpack" if d["index"] in taken else "cpu") for d in own]


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(float16)": np.float16, "tensor(bool)": np.bool_}
_PROFILE_TYPES = {"float": "float32", "float16": "float16", "int8": "int8", "uint8": "uint8", "int16": "int16",
                  "int32": "int32", "int64": "int64", "uint16": "uint16", "bool": "bool"}


def ort_node_providers(model: Path, providers: list[str], workdir: Path) -> list[NodePlacement]:
    """Which execution provider ran each node, from one profiled ONNX Runtime run on zeros.

    Nodes are the session's optimised graph (after QDQ fusion), in the profile's order; the dtype
    is the node's first input's type as the profile records it (``input_type_shape``).
    """
    import onnxruntime as ort

    workdir.mkdir(parents=True, exist_ok=True)
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(workdir / "ort_profile")
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model), sess_options=so, providers=providers)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        feeds[i.name] = np.zeros(shape, dtype=_ORT_DTYPES.get(i.type, np.float32))
    sess.run(None, feeds)
    trace = Path(sess.end_profiling())
    try:
        events = json.loads(trace.read_text(encoding="utf-8"))
    finally:
        trace.unlink(missing_ok=True)
    seen: dict[str, NodePlacement] = {}
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") != "Node" or "provider" not in args or not ev.get("name", "").endswith("_kernel_time"):
            continue
        name = ev["name"][: -len("_kernel_time")]
        if name in seen:
            continue
        first = next(iter(args.get("input_type_shape") or [{}]), {})
        dtype = _PROFILE_TYPES.get(next(iter(first), ""), next(iter(first), ""))
        seen[name] = NodePlacement(len(seen), args.get("op_name", "?"), dtype, args["provider"])
    return list(seen.values())


def ort_float_ops(model: Path) -> set[str] | None:
    """Op types that ONNX Runtime's CPU EP runs on float inputs in a quantized model's optimised graph (after its QDQ fusion),
    Q/DQ themselves aside; None when the model cannot run here."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="edgekit-float-ops-") as tmp:
            nodes = ort_node_providers(model, ["CPUExecutionProvider"], Path(tmp))
    except Exception:  # noqa: BLE001 - a report detail, never a failed conversion
        return None
    return {n.op for n in nodes if n.op not in {"QuantizeLinear", "DequantizeLinear"} and n.dtype in ("float32", "float16", "float64")}


def onnx_nodes(model: Path) -> list[NodePlacement]:
    """The ONNX graph's nodes with their first input's dtype (after shape inference), placement 'cpu'."""
    import onnx
    from onnx import helper, shape_inference

    m = onnx.load(str(model))
    try:
        m = shape_inference.infer_shapes(m)
    except Exception:  # noqa: BLE001 - a graph onnx cannot infer keeps the types it declares
        pass
    g = m.graph
    types = {i.name: i.type.tensor_type.elem_type for i in [*g.input, *g.value_info, *g.output]}
    types |= {t.name: t.data_type for t in g.initializer}

    def name(elem: int | None) -> str:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name if elem else ""

    return [NodePlacement(i, n.op_type, name(types.get(n.input[0])) if n.input else "", "cpu") for i, n in enumerate(g.node)]
