"""The trust chain: the publisher allow-list, its change log, the server key's rotations.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 22:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "publishers",
        sa.Column("key_id", sa.String(16), primary_key=True),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("public_key"),
    )
    op.create_table(
        "trust_changes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "server_key_rotations",
        sa.Column("sequence", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("old_key_id", sa.String(16), nullable=False),
        sa.Column("new_key_id", sa.String(16), nullable=False),
        sa.Column("new_public_key", sa.String(64), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("new_key_id"),
    )


def downgrade() -> None:
    op.drop_table("server_key_rotations")
    op.drop_table("trust_changes")
    op.drop_table("publishers")
