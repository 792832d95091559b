"""Alembic environment for genserve's app database.

Run programmatically by `serve_app.tenancy.db.upgrade` (which passes an open connection), so
migrations work from an installed package without an alembic.ini.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

import serve_app.adapters.models  # noqa: F401 - registers the adapters table on Base.metadata
import serve_app.jobs.models  # noqa: F401 - registers the jobs table on Base.metadata
import serve_app.library.models  # noqa: F401
import serve_app.webhooks.models  # noqa: F401
from serve_app.tenancy.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite can't ALTER most things
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    conn = config.attributes.get("connection")
    if conn is not None:
        _run(conn)
    else:
        engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
        with engine.connect() as c:
            _run(c)
            c.commit()
