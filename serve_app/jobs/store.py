"""Job records in the app database. Every state change is one conditional UPDATE, so two
replicas can never both own a job, and only the lease owner can finish it."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, and_, func, insert, or_, select, update

from serve_app.jobs.models import ACTIVE, TERMINAL, Job
from serve_app.tenancy.db import read_tx, write_tx
from telemetry.metrics import record_job_transition

CANCELLED_REASON = "cancelled by the client"


def new_job_id() -> str:
    return "job_" + secrets.token_urlsafe(12)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant_id: int
    status: str
    model: str
    spec: dict
    progress: float
    attempts: int
    max_attempts: int
    lease_owner: str | None
    lease_expires_at: float | None
    cancel_requested: bool
    error: str | None
    result_keys: list | None
    generation_id: str | None
    used: dict | None
    webhook_url: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, row: Any) -> JobRecord:
        return cls(**{f: getattr(row, f) for f in cls.__dataclass_fields__})


class JobStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, *, tenant_id: int, model: str, spec: dict, owner: str, lease_s: float, max_attempts: int,
               webhook_url: str | None) -> JobRecord:
        """A new job, leased to the replica that accepted it (so it is reclaimed if that one dies)."""
        job_id = new_job_id()
        with write_tx(self.engine) as conn:
            conn.execute(insert(Job).values(
                id=job_id, tenant_id=tenant_id, status="queued", model=model, spec=spec, progress=0.0, attempts=0,
                max_attempts=max_attempts, lease_owner=owner, lease_expires_at=time.time() + lease_s,
                cancel_requested=False, webhook_url=webhook_url, created_at=_now()))
        record_job_transition("queued")
        return self.get(job_id)

    def get(self, job_id: str, tenant_id: int | None = None) -> JobRecord | None:
        q = select(Job).where(Job.id == job_id)
        if tenant_id is not None:
            q = q.where(Job.tenant_id == tenant_id)
        with read_tx(self.engine) as conn:
            row = conn.execute(q).first()
        return JobRecord.of(row) if row else None

    def list(self, tenant_id: int, *, limit: int, after: str | None = None, status: str | None = None
             ) -> list[JobRecord]:
        """Newest first; `after` is the last id of the previous page."""
        q = select(Job).where(Job.tenant_id == tenant_id)
        if status:
            q = q.where(Job.status == status)
        with read_tx(self.engine) as conn:
            if after:
                anchor = conn.execute(select(Job.created_at, Job.id).where(
                    Job.id == after, Job.tenant_id == tenant_id)).first()
                if anchor is not None:
                    q = q.where(or_(Job.created_at < anchor[0], and_(Job.created_at == anchor[0], Job.id < anchor[1])))
            rows = conn.execute(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)).all()
        return [JobRecord.of(r) for r in rows]

    def backlog(self) -> int:
        with read_tx(self.engine) as conn:
            return int(conn.execute(select(func.count()).select_from(Job).where(Job.status.in_(ACTIVE))).scalar())

    def queue_position(self, job: JobRecord) -> int:
        """Active jobs of the same model accepted before this one."""
        with read_tx(self.engine) as conn:
            return int(conn.execute(select(func.count()).select_from(Job).where(
                Job.status.in_(ACTIVE), Job.model == job.model, Job.created_at < job.created_at)).scalar())

    def claim(self, job_id: str, owner: str, lease_s: float) -> JobRecord | None:
        """Take the job to run it: allowed for its current lease owner, or anyone once the lease
        expired. Counts an attempt. None when someone else holds it, it already ended, or its
        cancel was requested (one conditional UPDATE: a cancel committed first always wins)."""
        now = time.time()
        with write_tx(self.engine) as conn:
            res = conn.execute(update(Job).where(
                Job.id == job_id, Job.status.in_(ACTIVE), Job.cancel_requested.is_(False),
                or_(Job.lease_owner == owner, Job.lease_owner.is_(None), Job.lease_expires_at < now),
            ).values(status="running", lease_owner=owner, lease_expires_at=now + lease_s,
                     attempts=Job.attempts + 1, started_at=func.coalesce(Job.started_at, _now())))
            if res.rowcount != 1:
                return None
        record_job_transition("running")
        return self.get(job_id)

    def heartbeat(self, job_ids: list[str], owner: str, lease_s: float) -> dict[str, bool]:
        """Renew leases; returns job id -> cancel requested, for the jobs this owner still holds."""
        if not job_ids:
            return {}
        with write_tx(self.engine) as conn:
            conn.execute(update(Job).where(Job.id.in_(job_ids), Job.lease_owner == owner, Job.status.in_(ACTIVE))
                         .values(lease_expires_at=time.time() + lease_s))
            rows = conn.execute(select(Job.id, Job.cancel_requested).where(
                Job.id.in_(job_ids), Job.lease_owner == owner, Job.status.in_(ACTIVE))).all()
        return {r[0]: bool(r[1]) for r in rows}

    def cancels_requested(self, job_ids: list[str]) -> set[str]:
        """Which of these active jobs have a cancel requested (DELETE may land on any replica: the
        row is where the runner learns of it). A read by primary key, cheap enough to poll."""
        if not job_ids:
            return set()
        with read_tx(self.engine) as conn:
            rows = conn.execute(select(Job.id).where(Job.id.in_(job_ids), Job.cancel_requested.is_(True),
                                                     Job.status.in_(ACTIVE))).all()
        return {r[0] for r in rows}

    def end_cancelled(self, job_id: str, owner: str) -> bool:
        """End an active job whose cancel was requested but that no runner is running: one that
        was put back to the queue (a retry) or whose lease expired. By its owner or once its
        lease expired, so a runner still stopping it is not overtaken."""
        with write_tx(self.engine) as conn:
            done = conn.execute(update(Job).where(
                Job.id == job_id, Job.status.in_(ACTIVE), Job.cancel_requested.is_(True),
                or_(Job.lease_owner == owner, Job.lease_owner.is_(None), Job.lease_expires_at < time.time()),
            ).values(status="cancelled", error=CANCELLED_REASON, finished_at=_now(), lease_owner=None,
                     lease_expires_at=None)).rowcount == 1
        if done:
            record_job_transition("cancelled")
        return done

    def set_progress(self, job_id: str, owner: str, progress: float) -> None:
        with write_tx(self.engine) as conn:
            conn.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running")
                         .values(progress=progress))

    def release(self, job_id: str, owner: str, *, error: str | None = None) -> None:
        """Give the job back to the queue (e.g. the model was at capacity), lease expired now."""
        with write_tx(self.engine) as conn:
            released = conn.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                                      Job.status.in_(ACTIVE))
                                    .values(status="queued", lease_expires_at=0.0, error=error)).rowcount
        if released == 1:
            record_job_transition("queued")

    def finish(self, job_id: str, owner: str, status: str, *, error: str | None = None,
               result_keys: list | None = None, generation_id: str | None = None, used: dict | None = None) -> bool:
        """Terminal state, only by the lease owner. False if the lease was lost meanwhile."""
        values: dict[str, Any] = dict(status=status, error=error, finished_at=_now(), lease_owner=None,
                                      lease_expires_at=None)
        if status == "succeeded":
            values.update(progress=1.0, result_keys=result_keys, generation_id=generation_id, used=used)
        with write_tx(self.engine) as conn:
            done = conn.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                                  Job.status.in_(ACTIVE)).values(**values)).rowcount == 1
        if done:
            record_job_transition(status)
        return done

    def request_cancel(self, job_id: str, tenant_id: int) -> tuple[JobRecord | None, bool]:
        """A queued job is cancelled at once (so no runner can claim it after); a running one is
        flagged for its owner to stop. Returns (the job, whether this call ended it)."""
        with write_tx(self.engine) as conn:
            cancelled = conn.execute(
                update(Job).where(Job.id == job_id, Job.tenant_id == tenant_id, Job.status == "queued")
                .values(status="cancelled", cancel_requested=True, finished_at=_now(), lease_owner=None,
                        lease_expires_at=None, error=CANCELLED_REASON)).rowcount
            conn.execute(update(Job).where(Job.id == job_id, Job.tenant_id == tenant_id, Job.status == "running")
                         .values(cancel_requested=True))
        if cancelled == 1:
            record_job_transition("cancelled")
        return self.get(job_id, tenant_id), cancelled == 1

    def expired(self, limit: int = 50) -> list[JobRecord]:
        """Active jobs whose owner stopped renewing (a dead or overloaded replica)."""
        with read_tx(self.engine) as conn:
            rows = conn.execute(select(Job).where(Job.status.in_(ACTIVE), Job.lease_expires_at < time.time())
                                .order_by(Job.created_at).limit(limit)).all()
        return [JobRecord.of(r) for r in rows]

    def fail_exhausted(self, job_id: str, reason: str) -> bool:
        """Fail an expired job that used all its attempts (no owner can finish it any more)."""
        with write_tx(self.engine) as conn:
            failed = conn.execute(update(Job).where(
                Job.id == job_id, Job.status.in_(ACTIVE), Job.lease_expires_at < time.time(),
                Job.attempts >= Job.max_attempts,
            ).values(status="failed", error=reason, finished_at=_now(), lease_owner=None,
                     lease_expires_at=None)).rowcount == 1
        if failed:
            record_job_transition("failed")
        return failed

    def count_by_status(self) -> dict[str, int]:
        """Jobs per status, every status present (0 included), for the jobs-in-state gauge."""
        with read_tx(self.engine) as conn:
            rows = conn.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        return {**{s: 0 for s in (*ACTIVE, *TERMINAL)}, **{r[0]: int(r[1]) for r in rows}}
