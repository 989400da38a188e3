"""Per-minute telemetry rollups by artifact: what the field statistics read (one row per minute and artifact,
however many devices), kept by the telemetry writer in the transaction that stores the points. Existing
points are rolled up here.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 22:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

SUMS = ("requests", "errors", "escalations", "degraded", "p50_w", "p95_w", "p99_w", "points", *(f"h{i}" for i in range(10)))


def upgrade() -> None:
    op.create_table(
        "telemetry_rollups",
        sa.Column("model_sha256", sa.String(64), primary_key=True),
        sa.Column("minute", sa.DateTime(timezone=True), primary_key=True),
        *(sa.Column(name, sa.Float, nullable=False, server_default="0") for name in SUMS),
        sa.Column("latency_max", sa.Float, nullable=False, server_default="0"),
    )
    points = sa.table("telemetry_points", sa.column("minute", sa.DateTime(timezone=True)), sa.column("model_sha256", sa.String(64)),
                      sa.column("data", sa.JSON))
    d = points.c.data
    count = d["count"].as_float()
    exprs = [sa.func.sum(count), sa.func.sum(d["errors"].as_float()), sa.func.sum(d["escalations"].as_float()),
             sa.func.sum(d["degraded"].as_float()), sa.func.sum(count * d[("latency_ms", "p50")].as_float()),
             sa.func.sum(count * d[("latency_ms", "p95")].as_float()), sa.func.sum(count * d[("latency_ms", "p99")].as_float()),
             sa.func.count(), *(sa.func.sum(d[("confidence_hist", i)].as_float()) for i in range(10)),
             sa.func.max(d[("latency_ms", "max")].as_float())]
    rollups = sa.table("telemetry_rollups", *(sa.column(n) for n in ("model_sha256", "minute", *SUMS, "latency_max")))
    select = (sa.select(points.c.model_sha256, points.c.minute, *(sa.func.coalesce(e, 0) for e in exprs))
              .where(points.c.model_sha256.is_not(None)).group_by(points.c.model_sha256, points.c.minute))
    op.execute(rollups.insert().from_select(["model_sha256", "minute", *SUMS, "latency_max"], select))


def downgrade() -> None:
    op.drop_table("telemetry_rollups")
