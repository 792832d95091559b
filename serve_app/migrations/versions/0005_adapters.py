"""adapters: the LoRA adapter registry (issue 21)

Revision ID: 0005_adapters
Revises: 0004_job_used
Create Date: 2026-12-07

One row per registered adapter (tenant-owned, or global with tenant_id NULL). The archive itself
lives in the ResultStore under `adapters/<adapter_id>.zip`, shared by rows of the same content.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_adapters"
down_revision = "0004_job_used"
branch_labels = None
depends_on = None

_GLOBAL = sa.text("tenant_id IS NULL")


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("adapter_id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=True),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("base_model", sa.String(length=128), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("target_modules", sa.JSON(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("storage_key", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_adapters_tenant_id_tenants"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
    )
    op.create_index("uq_adapters_owner_name", "adapters", ["tenant_id", "name"], unique=True)
    op.create_index("uq_adapters_owner_adapter", "adapters", ["tenant_id", "adapter_id"], unique=True)
    op.create_index("uq_adapters_global_name", "adapters", ["name"], unique=True,
                    sqlite_where=_GLOBAL, postgresql_where=_GLOBAL)
    op.create_index("uq_adapters_global_adapter", "adapters", ["adapter_id"], unique=True,
                    sqlite_where=_GLOBAL, postgresql_where=_GLOBAL)
    op.create_index("ix_adapters_adapter_id", "adapters", ["adapter_id"])


def downgrade() -> None:
    op.drop_table("adapters")
