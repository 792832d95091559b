"""The `jobs` table. A job is durable from the moment `POST /v1/jobs` answers.

Ownership is a lease (`lease_owner` + `lease_expires_at`), renewed by the owning ingress replica's
heartbeat. A job whose lease expired (its replica died) is claimed again by any replica's reaper,
up to `max_attempts`; then it fails with a reason. Nothing stays `running` forever.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from serve_app.tenancy.models import Base

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(128))
    # The rendered request (tasks with their seeds): a re-run draws exactly the same images.
    spec: Mapped[dict] = mapped_column(JSON)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_owner: Mapped[str | None] = mapped_column(String(96))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)  # unix seconds
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)
    result_keys: Mapped[list | None] = mapped_column(JSON)
    generation_id: Mapped[str | None] = mapped_column(String(40))
    # What the images were actually generated with, written when the job succeeds: model, size,
    # steps used per image, degraded + reason (adaptive quality may lower steps under load).
    used: Mapped[dict | None] = mapped_column(JSON)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
    )


class JobPreview(Base):
    """The latest partial image of each image of a running job (`partial_images`), beside its
    progress: one row per (job, image), overwritten at each preview, removed when the job ends
    (jobs/previews.py). Size-capped by `jobs.preview_max_bytes`."""

    __tablename__ = "job_previews"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    image_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    png: Mapped[bytes] = mapped_column(LargeBinary)
    step: Mapped[int] = mapped_column(Integer)
    total: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
