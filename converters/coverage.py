"""Check a model's ops against the accelerators a hardware profile offers for a format."""

from __future__ import annotations

from collections import Counter

from edgekit.manifest import Coverage, OpPlacement
from edgekit.profiles import HardwareProfile

__all__ = ["op_coverage"]


def op_coverage(ops: list[str] | tuple[str, ...], profile: HardwareProfile, fmt: str, dtype_violations: tuple[str, ...] = ()) -> Coverage:
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
    target = accels[0]
    closed: set[str] = set()
    placed: Counter[tuple[str, str, str]] = Counter()
    for op in ops:
        where, reason = "cpu", "no accelerator in the profile supports it"
        for acc in accels:
            if acc.id in closed:
                continue
            if op in acc.supported_ops:
                where, reason = acc.id, ""
                break
            if acc.partitioning == "prefix":
                closed.add(acc.id)
        if where != target.id:
            if target.id in closed and op in target.supported_ops:
                reason = f"after the first op {target.name} cannot run, the rest of the graph stays off it"
            elif op not in target.supported_ops:
                reason = f"not on {target.name}'s supported-op list" + (f"; runs on {where}" if where != "cpu" else "")
        placed[(op, where, reason)] += 1
    on_target = sum(n for (_, where, _), n in placed.items() if where == target.id)
    placements = tuple(OpPlacement(op=o, count=n, placement=w, reason=r) for (o, w, r), n in sorted(placed.items()))
    fallbacks = tuple(sorted({o for (o, w, _) in placed if w != target.id}))
    return Coverage(
        target=target.id,
        total_ops=len(ops),
        ops_on_target=on_target,
        share_on_target=on_target / len(ops) if ops else 0.0,
        ops=placements,
        fallbacks=fallbacks,
        dtype_violations=dtype_violations,
    )
