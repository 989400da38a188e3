"""Fleet operations: named and revocable tokens, the audit log, device decommission, wave bake times,
and an index for per-version field statistics.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 22:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tokens") as t:
        t.add_column(sa.Column("name", sa.String(64), nullable=True))
        t.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        t.create_unique_constraint("uq_tokens_name", ["name"])
    with op.batch_alter_table("devices") as t:
        t.add_column(sa.Column("decommissioned_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("rollout_waves") as t:
        t.add_column(sa.Column("bake_started_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_telemetry_points_sha_minute", "telemetry_points", ["model_sha256", "minute"], unique=False)
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("token_id", sa.Integer, nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(200), nullable=True),
        sa.Column("remote_addr", sa.String(64), nullable=True),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("result", sa.String(64), nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_audit_events_at", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_index("ix_telemetry_points_sha_minute", table_name="telemetry_points")
    with op.batch_alter_table("rollout_waves") as t:
        t.drop_column("bake_started_at")
    with op.batch_alter_table("devices") as t:
        t.drop_column("decommissioned_at")
    with op.batch_alter_table("tokens") as t:
        t.drop_constraint("uq_tokens_name", type_="unique")
        t.drop_column("revoked_at")
        t.drop_column("name")
