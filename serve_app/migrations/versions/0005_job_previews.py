"""job_previews: the latest partial image of each image of a running job

Revision ID: 0005_job_previews
Revises: 0004_job_used
Create Date: 2026-12-07

One row per (job, image index), overwritten at each preview and deleted when the job ends, so the
table holds only running jobs' previews (each under `jobs.preview_max_bytes`).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_job_previews"
down_revision = "0004_job_used"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_previews",
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("image_index", sa.Integer(), nullable=False),
        sa.Column("png", sa.LargeBinary(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_previews_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "image_index", name=op.f("pk_job_previews")),
    )


def downgrade() -> None:
    op.drop_table("job_previews")
