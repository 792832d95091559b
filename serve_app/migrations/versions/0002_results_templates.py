"""template library, generation log, webhook deliveries

Revision ID: 0002_results_templates
Revises: 0001_tenancy
Create Date: 2026-11-22

Versioned prompt templates (tenant-owned or shared) with an exact-match tag table, the generation
log with ratings, and one row per webhook delivery attempt. Result files themselves live in the
ResultStore (local dir or S3), not here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002_results_templates'
down_revision = '0001_tenancy'
branch_labels = None
depends_on = None

_SHARED = sa.text("tenant_id IS NULL")


def upgrade() -> None:
    op.create_table('prompt_templates',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=True),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('category', sa.String(length=64), nullable=False),
    sa.Column('template', sa.Text(), nullable=False),
    sa.Column('defaults', sa.String(length=1024), nullable=False),
    sa.Column('tags', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_prompt_templates_tenant_id_tenants'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_prompt_templates')),
    sa.UniqueConstraint('tenant_id', 'name', 'version', name=op.f('uq_prompt_templates_tenant_id'))
    )
    op.create_index('ix_prompt_templates_name', 'prompt_templates', ['name'])
    op.create_index('ix_prompt_templates_category', 'prompt_templates', ['category'])
    op.create_index('uq_prompt_templates_shared_name_version', 'prompt_templates', ['name', 'version'], unique=True,
                    sqlite_where=_SHARED, postgresql_where=_SHARED)
    op.create_table('prompt_template_tags',
    sa.Column('template_id', sa.Integer(), nullable=False),
    sa.Column('tag', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['template_id'], ['prompt_templates.id'],
                            name=op.f('fk_prompt_template_tags_template_id_prompt_templates'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('template_id', 'tag', name=op.f('pk_prompt_template_tags'))
    )
    op.create_index('ix_prompt_template_tags_tag', 'prompt_template_tags', ['tag'])
    op.create_table('generations',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=True),
    sa.Column('template_id', sa.Integer(), nullable=True),
    sa.Column('template_name', sa.String(length=128), nullable=True),
    sa.Column('template_version', sa.Integer(), nullable=True),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('negative_prompt', sa.Text(), nullable=False),
    sa.Column('model', sa.String(length=128), nullable=False),
    sa.Column('seeds', sa.JSON(), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('result_keys', sa.JSON(), nullable=False),
    sa.Column('result_urls', sa.JSON(), nullable=False),
    sa.Column('latency_s', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('rating', sa.Integer(), nullable=True),
    sa.Column('rated_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_generations_tenant_id_tenants'),
                            ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['template_id'], ['prompt_templates.id'],
                            name=op.f('fk_generations_template_id_prompt_templates'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_generations'))
    )
    op.create_index(op.f('ix_generations_job_id'), 'generations', ['job_id'])
    op.create_index(op.f('ix_generations_template_id'), 'generations', ['template_id'])
    op.create_index('ix_generations_tenant_created', 'generations', ['tenant_id', 'created_at'])
    op.create_table('webhook_deliveries',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('delivery_id', sa.String(length=40), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=True),
    sa.Column('url', sa.String(length=2048), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('duration_s', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries'))
    )
    op.create_index(op.f('ix_webhook_deliveries_delivery_id'), 'webhook_deliveries', ['delivery_id'])
    op.create_index(op.f('ix_webhook_deliveries_job_id'), 'webhook_deliveries', ['job_id'])


def downgrade() -> None:
    op.drop_table('webhook_deliveries')
    op.drop_table('generations')
    op.drop_table('prompt_template_tags')
    op.drop_table('prompt_templates')
