"""Index rollout devices by (rollout, wave, finished): the engine asks "is anyone in this wave unfinished?" after every report.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 11:36:00
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_rollout_devices_wave", "rollout_devices", ["rollout_id", "wave_index", "finished"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_rollout_devices_wave", table_name="rollout_devices")
