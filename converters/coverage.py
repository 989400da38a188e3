"""Check a model's ops against the accelerators a hardware profile offers for a format.

With the model file at hand, the placement comes from the runtime itself where it runs here
(LiteRT's XNNPACK delegate, ONNX Runtime's execution providers; see coverage_runtime) or from
the Edge TPU compiler when it is on PATH; otherwise it is estimated from the vendor's
supported-op list with dtype rules, and the coverage says so in ``basis``.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from converters import coverage_rules, coverage_runtime, edgetpu_compiler
from edgekit.manifest import Coverage, OpPlacement
from edgekit.profiles import Accelerator, HardwareProfile

__all__ = ["op_coverage"]

ESTIMATED = "estimated from the vendor's supported-op list with dtype rules (not run here)"


def op_coverage(ops: list[str] | tuple[str, ...], profile: HardwareProfile, fmt: str, dtype_violations: tuple[str, ...] = (),
                model_path: Path | None = None) -> Coverage:
    """The model's placement on the profile's target, measured where the runtime runs here.

    Without ``model_path`` (or when nothing can be measured) the estimate of ``estimated_coverage``.
    """
    accels = profile.accelerators_for(fmt)
    if model_path is None or not accels:
        return _with(estimated_coverage(ops, profile, fmt, dtype_violations), basis=ESTIMATED if accels else "")
    target = accels[0]
    if fmt == "tflite" and target.id == "edgetpu":
        return _edgetpu(ops, profile, fmt, dtype_violations, Path(model_path), target)
    note = ""
    try:
        if fmt == "tflite" and target.id == "xnnpack":
            nodes = coverage_runtime.litert_xnnpack_placement(Path(model_path))
            return _measured(nodes, target, dtype_violations, f"measured on host ({coverage_runtime.xnnpack_host_label()})",
                             lambda n: f"LiteRT's XNNPACK delegate did not take {n.op} with {n.dtype or '?'} inputs on this host; "
                                       "it runs on LiteRT's built-in (reference/optimized) CPU kernels")
        if fmt == "onnx":
            return _onnx(ops, profile, dtype_violations, Path(model_path), target)
    except ImportError as e:
        note = f"the runtime is not installed here ({e.name}): placement estimated"
    except Exception as e:  # noqa: BLE001 - a runtime that cannot run the model here must not fail the conversion
        note = f"the runtime could not report the placement here ({type(e).__name__}: {str(e)[:200]}): placement estimated"
    nodes = _tflite_nodes(Path(model_path)) if fmt == "tflite" else _onnx_nodes(Path(model_path)) if fmt == "onnx" else None
    return _estimated_with_dtypes(ops, profile, fmt, dtype_violations, nodes, note=note)


def _with(c: Coverage, **changes: str) -> Coverage:
    return c.model_copy(update=changes)


def _tflite_nodes(model: Path) -> list[coverage_runtime.NodePlacement] | None:
    try:
        return coverage_runtime.litert_nodes(model)
    except (ImportError, ValueError, RuntimeError):
        return None


def _onnx_nodes(model: Path) -> list[coverage_runtime.NodePlacement] | None:
    """Node dtypes of an .onnx file; None for an ORT-format file (onnx cannot read it) or a graph it cannot parse."""
    if model.suffix == ".ort":
        return None
    try:
        return coverage_runtime.onnx_nodes(model)
    except Exception:  # noqa: BLE001 - onnx raises DecodeError/ValueError/...: fall back to the op list alone
        return None


def _estimated_with_dtypes(ops: list[str] | tuple[str, ...], profile: HardwareProfile, fmt: str, dtype_violations: tuple[str, ...],
                           nodes: list[coverage_runtime.NodePlacement] | None, note: str = "") -> Coverage:
    """The static estimate, with each node's dtype and attributes checked (coverage_rules) when they can be read."""
    base = estimated_coverage(ops if nodes is None else [n.op for n in nodes], profile, fmt, dtype_violations)
    if nodes is None:
        return _with(base, basis=ESTIMATED, note=note)
    target = profile.accelerators_for(fmt)[0]
    est = estimated_placements([n.op for n in nodes], profile, fmt, nodes)
    placed: Counter[tuple[str, str, str, str]] = Counter()
    for n, (where, reason) in zip(nodes, est):
        placed[(n.op, n.dtype, where, reason)] += 1
    return _table(placed, target.id, len(nodes), dtype_violations, ESTIMATED, note)


def _table(placed: Counter, target: str, total: int, dtype_violations: tuple[str, ...], basis: str, note: str = "") -> Coverage:
    on_target = sum(n for (_, _, where, _), n in placed.items() if where == target)
    rows = tuple(OpPlacement(op=o, dtype=d, count=n, placement=w, reason=r) for (o, d, w, r), n in sorted(placed.items()))
    return Coverage(target=target, total_ops=total, ops_on_target=on_target, share_on_target=on_target / total if total else 0.0,
                    ops=rows, fallbacks=tuple(sorted({o for (o, _, w, _) in placed if w != target})),
                    dtype_violations=dtype_violations, basis=basis, note=note)


def _measured(nodes: list[coverage_runtime.NodePlacement], target: Accelerator, dtype_violations: tuple[str, ...], basis: str,
              why_off) -> Coverage:  # noqa: ANN001 - a small callable NodePlacement -> str
    placed: Counter[tuple[str, str, str, str]] = Counter()
    for n in nodes:
        on = n.placement == target.id
        placed[(n.op, n.dtype, target.id if on else "cpu", "" if on else why_off(n))] += 1
    return _table(placed, target.id, len(nodes), dtype_violations, basis)


def _onnx(ops: list[str] | tuple[str, ...], profile: HardwareProfile, dtype_violations: tuple[str, ...], model: Path,
          target: Accelerator) -> Coverage:
    import onnxruntime as ort

    wanted = list(profile.formats.onnx.execution_providers) if profile.formats.onnx else ["CPUExecutionProvider"]
    if wanted[0] not in ort.get_available_providers():
        note = f"{wanted[0]} is not available in this ONNX Runtime build; placement estimated"
        return _estimated_with_dtypes(ops, profile, "onnx", dtype_violations, _onnx_nodes(model), note=note)
    with tempfile.TemporaryDirectory(prefix="edgekit-ortprof-") as tmp:
        nodes = coverage_runtime.ort_node_providers(model, [p for p in wanted if p in ort.get_available_providers()], Path(tmp))
    nodes = [coverage_runtime.NodePlacement(n.index, n.op, n.dtype, target.id if n.placement == wanted[0] else n.placement)
             for n in nodes]
    basis = f"measured on host (ONNX Runtime {ort.__version__} session profile, {wanted[0]}; nodes after graph optimisation)"
    return _measured(nodes, target, dtype_violations, basis,
                     lambda n: f"ONNX Runtime ran {n.op} ({n.dtype or '?'}) on {n.placement}, not {wanted[0]}")


def _edgetpu(ops: list[str] | tuple[str, ...], profile: HardwareProfile, fmt: str, dtype_violations: tuple[str, ...], model: Path,
             target: Accelerator) -> Coverage:
    if edgetpu_compiler.compiler_path() is None:
        return _estimated_with_dtypes(ops, profile, fmt, dtype_violations, _tflite_nodes(model), note=edgetpu_compiler.NOT_COMPILED_NOTE)
    with tempfile.TemporaryDirectory(prefix="edgekit-edgetpu-") as tmp:
        _, rows, _ = edgetpu_compiler.compile_for_edgetpu(model, Path(tmp))
    placed: Counter[tuple[str, str, str, str]] = Counter()
    for r in rows:
        placed[(r.op, "", target.id if r.mapped else "cpu", "" if r.mapped else f"edgetpu_compiler: {r.status}")] += r.count
    total = sum(r.count for r in rows)
    return _table(placed, target.id, total, dtype_violations, "measured by edgetpu_compiler -s on this host (its op mapping)",
                  note="compiled here for the check; the bundle carries the uncompiled model: compile it with edgetpu_compiler before deploying")


def estimated_placements(ops: list[str] | tuple[str, ...], profile: HardwareProfile, fmt: str,
                         nodes: list[coverage_runtime.NodePlacement] | None = None) -> list[tuple[str, str]]:
    """(placement, reason) per op, in order, from the profile's supported-op lists.

    With ``nodes`` (the same ops with dtypes and shapes) an accelerator also refuses a node its
    dtype or attribute rules exclude (coverage_rules); for a ``prefix`` accelerator that closes it.
    """
    accels = profile.accelerators_for(fmt)
    target = accels[0]
    closed: set[str] = set()
    out: list[tuple[str, str]] = []
    for i, op in enumerate(ops):
        where, reason = "cpu", "no accelerator in the profile supports it"
        refused: dict[str, str] = {}
        for acc in accels:
            if acc.id in closed:
                continue
            if op in acc.supported_ops:
                why = coverage_rules.refusal(acc, nodes[i]) if nodes is not None else ""
                if not why:
                    where, reason = acc.id, ""
                    break
                refused[acc.id] = why
            if acc.partitioning == "prefix":
                closed.add(acc.id)
        if where != target.id:
            if target.id in refused:
                reason = refused[target.id] + (f"; runs on {where}" if where != "cpu" else "")
            elif target.id in closed and op in target.supported_ops:
                reason = f"after the first op {target.name} cannot run, the rest of the graph stays off it"
            elif op not in target.supported_ops:
                reason = f"not on {target.name}'s supported-op list" + (f"; runs on {where}" if where != "cpu" else "")
        out.append((where, reason))
    return out


def estimated_coverage(ops: list[str] | tuple[str, ...], profile: HardwareProfile, fmt: str,
                       dtype_violations: tuple[str, ...] = ()) -> Coverage:
    """Place each op (in execution order) on the first accelerator that takes it.

    The first delegate in the profile is the target. An accelerator with ``prefix``
    partitioning (the Edge TPU) takes nothing after its first unsupported op, as its
    compiler does. Ops no accelerator takes fall back to the runtime's CPU kernels.
    """
    accels = profile.accelerators_for(fmt)
    if not accels:
        counts = Counter(ops)
        placements = tuple(OpPlacement(op=o, count=n, placement="cpu") for o, n in sorted(counts.items()))
        return Coverage(target="cpu", total_ops=len(ops), ops_on_target=len(ops), share_on_target=1.0 if ops else 0.0,
                        ops=placements, fallbacks=(), dtype_violations=dtype_violations)
    placed: Counter[tuple[str, str, str, str]] = Counter()
    for op, (where, reason) in zip(ops, estimated_placements(ops, profile, fmt)):
        placed[(op, "", where, reason)] += 1
    return _table(placed, accels[0].id, len(ops), dtype_violations, "")
