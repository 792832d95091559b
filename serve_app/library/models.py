"""Tables of the template library and the generation log (migration 0002_results_templates).

`tenant_id` NULL on a template means shared (visible to every tenant, managed by the CLI). Tags are
kept twice: as a JSON list on the row (returned as-is) and one row per tag in
`prompt_template_tags`, so an exact-tag search is a plain indexed equality on SQLite and Postgres.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from serve_app.tenancy.models import Base


class PromptTemplateRow(Base):
    __tablename__ = "prompt_templates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    category: Mapped[str] = mapped_column(String(64))
    template: Mapped[str] = mapped_column(Text)
    defaults: Mapped[str] = mapped_column(String(1024))
    tags: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("tenant_id", "name", "version"),
        # NULLs are distinct in a unique constraint, so shared templates need their own index.
        Index("uq_prompt_templates_shared_name_version", "name", "version", unique=True,
              sqlite_where=text("tenant_id IS NULL"), postgresql_where=text("tenant_id IS NULL")),
        Index("ix_prompt_templates_name", "name"),
        Index("ix_prompt_templates_category", "category"),
    )


class PromptTemplateTag(Base):
    __tablename__ = "prompt_template_tags"
    template_id: Mapped[int] = mapped_column(ForeignKey("prompt_templates.id", ondelete="CASCADE"),
                                             primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)

    __table_args__ = (Index("ix_prompt_template_tags_tag", "tag"),)


class Generation(Base):
    __tablename__ = "generations"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # gen_...
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[str | None] = mapped_column(String(64), index=True)
    template_id: Mapped[int | None] = mapped_column(ForeignKey("prompt_templates.id", ondelete="SET NULL"),
                                                    index=True)
    template_name: Mapped[str | None] = mapped_column(String(128))
    template_version: Mapped[int | None] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(128))
    seeds: Mapped[list[int]] = mapped_column(JSON)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    result_keys: Mapped[list[str]] = mapped_column(JSON)
    result_urls: Mapped[list[str]] = mapped_column(JSON)
    latency_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    rating: Mapped[int | None] = mapped_column(Integer)
    rated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_generations_tenant_created", "tenant_id", "created_at"),)
