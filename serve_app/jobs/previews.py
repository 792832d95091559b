"""A running job's latest partial images, kept where its progress lives: the app database
(`job_previews`), so `GET /v1/jobs/{id}/preview` answers on whichever ingress replica it reaches.

Written by the replica running the job (only while it holds the job's lease: a late preview can't
outlive the job), one row per image overwritten at each preview, each under a byte cap, and
deleted when the job ends (the results replace them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError

from serve_app.jobs.models import Job, JobPreview
from serve_app.tenancy.db import read_tx, write_tx

logger = logging.getLogger("genserve.jobs")


@dataclass(frozen=True)
class Preview:
    png: bytes
    image_index: int
    step: int
    total: int
    updated_at: datetime


class PreviewStore:
    def __init__(self, engine: Engine, *, max_bytes: int) -> None:
        self.engine = engine
        self.max_bytes = max_bytes

    def put(self, job_id: str, owner: str, image_index: int, png: bytes, *, step: int, total: int) -> bool:
        """Replace image `image_index`'s preview while `owner` runs the job. False when skipped
        (too large, or the job is no longer running under this owner)."""
        if len(png) > self.max_bytes:
            logger.info("job %s: a %d-byte preview exceeds jobs.preview_max_bytes (%d); skipped", job_id, len(png),
                        self.max_bytes)
            return False
        try:
            with write_tx(self.engine) as conn:
                running = conn.execute(select(Job.id).where(Job.id == job_id, Job.lease_owner == owner,
                                                            Job.status == "running")).first()
                if running is None:
                    return False
                conn.execute(delete(JobPreview).where(JobPreview.job_id == job_id,
                                                      JobPreview.image_index == image_index))
                conn.execute(insert(JobPreview).values(job_id=job_id, image_index=image_index, png=png, step=step,
                                                       total=total, updated_at=datetime.now(UTC)))
        except IntegrityError:  # a concurrent write of the same image won: its preview is as recent
            return False
        return True

    def latest(self, job_id: str, image_index: int | None = None) -> Preview | None:
        """Image `image_index`'s preview, or (None) the most recently written of any image."""
        q = select(JobPreview).where(JobPreview.job_id == job_id)
        if image_index is not None:
            q = q.where(JobPreview.image_index == image_index)
        with read_tx(self.engine) as conn:
            row = conn.execute(q.order_by(JobPreview.updated_at.desc(), JobPreview.image_index).limit(1)).first()
        if row is None:
            return None
        return Preview(png=row.png, image_index=row.image_index, step=row.step, total=row.total,
                       updated_at=row.updated_at)

    def clear(self, job_id: str) -> None:
        with write_tx(self.engine) as conn:
            conn.execute(delete(JobPreview).where(JobPreview.job_id == job_id))


__all__ = ["Preview", "PreviewStore"]
