"""Delivery attempts in the app database (`webhook_deliveries`)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime

import anyio
from sqlalchemy import Engine, insert, select

from serve_app.tenancy.db import read_tx, write_tx
from serve_app.webhooks.delivery import DeliveryAttempt
from serve_app.webhooks.models import WebhookDeliveryRow

WD = WebhookDeliveryRow.__table__


class DeliveryLog:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record(self, attempt: DeliveryAttempt) -> None:
        with write_tx(self.engine) as conn:
            conn.execute(insert(WD).values(**asdict(attempt)))

    async def arecord(self, attempt: DeliveryAttempt) -> None:
        await anyio.to_thread.run_sync(self.record, attempt)

    def attempts(self, *, job_id: str | None = None, delivery_id: str | None = None) -> list[DeliveryAttempt]:
        cond = []
        if job_id is not None:
            cond.append(WD.c.job_id == job_id)
        if delivery_id is not None:
            cond.append(WD.c.delivery_id == delivery_id)
        with read_tx(self.engine) as conn:
            rows = conn.execute(select(WD).where(*cond).order_by(WD.c.id)).all()
        return [DeliveryAttempt(r.delivery_id, r.job_id, r.url, r.attempt, r.status_code, r.error, r.duration_s,
                                _aware(r.created_at)) for r in rows]


def _aware(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt  # SQLite returns naive UTC
