"""Alembic builds the schema from an empty database on SQLite and Postgres, matching the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from servers import db_url, postgres_server  # noqa: F401  (fixtures)
from sqlalchemy import inspect

from serve_app.tenancy.db import downgrade, make_engine, upgrade
from serve_app.tenancy.models import Base

TABLES = {"tenants", "api_keys", "usage_events", "usage_daily", "budget_periods", "budget_holds",
          "rate_counters", "in_flight", "in_flight_leases",
          # template library, generation log, webhook deliveries (0002), jobs (0003)
          "prompt_templates", "prompt_template_tags", "generations", "webhook_deliveries", "jobs", "job_previews",
          # LoRA adapter registry (0006)
          "adapters"}


def test_upgrade_from_empty_matches_models_and_downgrades(db_url: str) -> None:  # noqa: F811
    engine = make_engine(db_url)
    assert set(inspect(engine).get_table_names()) == set()
    upgrade(engine)
    upgrade(engine)  # idempotent: every replica runs it at start-up
    assert set(inspect(engine).get_table_names()) == TABLES | {"alembic_version"}
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    downgrade(engine)
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    engine.dispose()


def test_concurrent_startup_upgrades_once(db_url: str) -> None:  # noqa: F811
    import threading

    engines = [make_engine(db_url) for _ in range(3)]
    errors: list[BaseException] = []

    def run(e) -> None:  # type: ignore[no-untyped-def]
        try:
            upgrade(e)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert TABLES <= set(inspect(engines[0]).get_table_names())
    for e in engines:
        e.dispose()
