"""Telemetry rollups: the writer adds each batch's points, summed per (artifact, minute), to ``telemetry_rollups``
in the transaction that stores the points, so the field statistics read one row per minute and artifact
instead of one per device-minute (and never parse JSON)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import case
from sqlalchemy.orm import Session

from fleet_server.tables import TelemetryRollup

__all__ = ["SUMS", "rollup_rows", "upsert_rollups"]

SUMS = ("requests", "errors", "escalations", "degraded", "p50_w", "p95_w", "p99_w", "points", *(f"h{i}" for i in range(10)))


def rollup_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Point rows (as the writer inserts them) summed per (artifact, minute); points without an artifact are left out."""
    out: dict[tuple[str, Any], dict[str, Any]] = {}
    for r in rows:
        sha = r["model_sha256"]
        if sha is None:
            continue
        d = r["data"]
        lat = d.get("latency_ms") or {}
        n = float(d.get("count") or 0)
        acc = out.get((sha, r["minute"]))
        if acc is None:
            acc = out[(sha, r["minute"])] = {"model_sha256": sha, "minute": r["minute"], **dict.fromkeys(SUMS, 0.0), "latency_max": 0.0}
        acc["requests"] += n
        acc["errors"] += float(d.get("errors") or 0)
        acc["escalations"] += float(d.get("escalations") or 0)
        acc["degraded"] += float(d.get("degraded") or 0)
        for q in ("p50", "p95", "p99"):
            acc[f"{q}_w"] += n * float(lat.get(q) or 0)
        acc["latency_max"] = max(acc["latency_max"], float(lat.get("max") or 0))
        acc["points"] += 1
        for i, v in enumerate((d.get("confidence_hist") or [])[:10]):
            acc[f"h{i}"] += float(v)
    return [out[k] for k in sorted(out, key=lambda k: (k[0], k[1]))]  # one order for every writer: no lock-order deadlocks


def upsert_rollups(s: Session, rollups: list[dict[str, Any]]) -> None:
    """Add the sums to their rows (``INSERT … ON CONFLICT DO UPDATE``, SQLite and PostgreSQL)."""
    if not rollups:
        return
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    t = TelemetryRollup.__table__
    stmt = insert(t)
    ex = stmt.excluded
    sets = {name: t.c[name] + ex[name] for name in SUMS}
    sets["latency_max"] = case((ex.latency_max > t.c.latency_max, ex.latency_max), else_=t.c.latency_max)
    for row in rollups:
        s.execute(stmt.on_conflict_do_update(index_elements=[t.c.model_sha256, t.c.minute], set_=sets), row)
