"""jobs.used: what a finished job actually ran with

Revision ID: 0004_job_used
Revises: 0003_jobs
Create Date: 2026-11-23

One nullable JSON column, written when a job succeeds: model, size, steps used per image, the
steps asked for, and `degraded`/`reason` (adaptive quality lowers steps under load). Jobs that
finished before this migration keep NULL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_job_used"
down_revision = "0003_jobs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("used", sa.JSON(), nullable=True))


def downgrade() -> None:
    # SQLite can't drop a column in place: batch mode copies the table (Postgres: plain ALTER).
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("used")
