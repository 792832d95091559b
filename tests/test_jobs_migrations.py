"""Migration 0004 (jobs.used) on SQLite and Postgres: a job written under 0003 survives the
upgrade with `used` NULL, the column matches the model, and the downgrade drops only the column."""

from __future__ import annotations

from datetime import UTC, datetime

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from servers import db_url, postgres_server  # noqa: F401  (fixtures)
from sqlalchemy import inspect, select, text, update

from serve_app.jobs.models import Job
from serve_app.tenancy.db import downgrade, make_engine, upgrade
from serve_app.tenancy.models import Base

USED = {"model": "m", "width": 64, "height": 64, "steps_used": [2, 1], "requested_steps": [2, 2],
        "degraded": True, "reason": "load"}


def _columns(engine) -> set[str]:  # type: ignore[no-untyped-def]
    return {c["name"] for c in inspect(engine).get_columns("jobs")}


def _insert_job(engine) -> None:  # type: ignore[no-untyped-def]
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (name, plan, created_at) VALUES ('t', 'free', :now)"), {"now": now})
        conn.execute(text(
            "INSERT INTO jobs (id, tenant_id, status, model, spec, progress, attempts, max_attempts, "
            "cancel_requested, created_at) SELECT 'job_old', id, 'succeeded', 'm', '{\"tasks\": []}', 1.0, 1, 3, "
            ":f, :now FROM tenants WHERE name = 't'"), {"now": now, "f": False})


def test_0004_adds_used_keeps_old_jobs_and_downgrades(db_url: str) -> None:  # noqa: F811
    engine = make_engine(db_url)
    upgrade(engine, "0003_jobs")
    assert "used" not in _columns(engine)
    _insert_job(engine)
    upgrade(engine)
    assert "used" in _columns(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT used FROM jobs WHERE id = 'job_old'")).scalar() is None
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert [d for d in diff if "jobs" in repr(d)] == []

    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == "job_old").values(used=USED))
    with engine.connect() as conn:
        assert conn.execute(select(Job.used).where(Job.id == "job_old")).scalar() == USED

    downgrade(engine, "0003_jobs")
    assert "used" not in _columns(engine)
    with engine.connect() as conn:  # the row (and the table's indexes) survive the column drop
        assert conn.execute(text("SELECT status FROM jobs WHERE id = 'job_old'")).scalar() == "succeeded"
    assert {i["name"] for i in inspect(engine).get_indexes("jobs")} >= {"ix_jobs_tenant_created",
                                                                         "ix_jobs_status_lease"}
    upgrade(engine)  # and up again
    assert "used" in _columns(engine)
    engine.dispose()
