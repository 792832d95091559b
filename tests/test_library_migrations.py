"""Migration 0002 (templates, generations, webhook deliveries) on SQLite and Postgres: it matches
the models, enforces uniqueness of shared template versions, and downgrades cleanly."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from servers import db_url, postgres_server  # noqa: F401  (fixtures)
from sqlalchemy import insert, inspect
from sqlalchemy.exc import IntegrityError

import serve_app.library.models  # noqa: F401  (registers the tables on Base)
import serve_app.webhooks.models  # noqa: F401
from serve_app.library.models import PromptTemplateRow
from serve_app.tenancy.db import downgrade, make_engine, upgrade
from serve_app.tenancy.models import Base

MINE = {"prompt_templates", "prompt_template_tags", "generations", "webhook_deliveries"}


def test_0002_matches_models_and_downgrades(db_url: str) -> None:  # noqa: F811
    engine = make_engine(db_url)
    upgrade(engine)
    assert MINE <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert [d for d in diff if any(t in repr(d) for t in MINE)] == []
    row = dict(tenant_id=None, name="n", version=1, category="c", template="t", defaults="", tags=[],
               created_at=datetime.now(UTC))
    with engine.begin() as conn:
        conn.execute(insert(PromptTemplateRow).values(**row))
    with pytest.raises(IntegrityError), engine.begin() as conn:  # NULL tenant: the partial unique index
        conn.execute(insert(PromptTemplateRow).values(**row))
    downgrade(engine, "0001_tenancy")
    assert not MINE & set(inspect(engine).get_table_names())
    assert "tenants" in inspect(engine).get_table_names()
    engine.dispose()
