"""The `adapters` table (migration 0005_adapters). `tenant_id` NULL = a global adapter (CLI/admin).

Names are unique per owner, and so is the content (`adapter_id`, the archive's hash prefix): one
tenant can't register one archive twice, two tenants can (they share the stored object).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from serve_app.tenancy.models import Base

_GLOBAL = text("tenant_id IS NULL")


class AdapterRow(Base):
    __tablename__ = "adapters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_id: Mapped[str] = mapped_column(String(40))
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    base_model: Mapped[str] = mapped_column(String(128))
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("uq_adapters_owner_name", "tenant_id", "name", unique=True),
        Index("uq_adapters_owner_adapter", "tenant_id", "adapter_id", unique=True),
        # NULLs are distinct in a unique index, so global adapters need their own.
        Index("uq_adapters_global_name", "name", unique=True, sqlite_where=_GLOBAL, postgresql_where=_GLOBAL),
        Index("uq_adapters_global_adapter", "adapter_id", unique=True, sqlite_where=_GLOBAL,
              postgresql_where=_GLOBAL),
        Index("ix_adapters_adapter_id", "adapter_id"),
    )
