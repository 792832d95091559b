"""Engine set-up, the dialect-neutral upsert, and `upgrade head` under a cross-process lock.

Sync SQLAlchemy: the same code serves the ingress (called through worker threads), the CLI and
tests; sqlite3 and psycopg 3 are mature sync drivers, and each request runs a few short statements.
SQLite write transactions start with BEGIN IMMEDIATE so multi-statement check-and-reserve steps
from several processes serialize instead of failing with SQLITE_BUSY on lock upgrade.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url

from serve_app.text_guard import loads_repaired

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_PG_MIGRATION_LOCK = 0x67656E73  # any constant shared by all replicas ("gens")


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    # Stored JSON is read back repaired: a row holding a lone surrogate (written before the edge
    # check in serve_app/text_guard.py) would otherwise fail every response that includes it.
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:"):
            _create_private(Path(db))
        engine = create_engine(
            url, pool_size=pool_size, max_overflow=pool_size,
            connect_args={"timeout": 60, "check_same_thread": False}, json_deserializer=loads_repaired,
        )
        _sqlite_events(engine)
        return engine
    if parsed.drivername == "postgresql":  # default to psycopg 3, the driver we ship
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True,
                         json_deserializer=loads_repaired)


def _create_private(path: Path) -> None:
    """Create a new database file as 0600 before SQLite opens it (it would use 0644 under the usual
    umask; its WAL and shared-memory files copy the main file's mode). It holds key hashes, usage
    and prompts. An existing file keeps its mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def _sqlite_events(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let the "begin" hook below emit BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL never corrupts the file; it only skips the fsync per commit (a power
        # loss may drop the last transactions). Per-request commits were fsync-bound otherwise.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@contextmanager
def write_tx(engine: Engine) -> Iterator[Connection]:
    """A transaction that will write: commit on success, roll back on any exception."""
    with engine.connect() as conn:
        conn = conn.execution_options(write=True)
        with conn.begin():
            yield conn


@contextmanager
def read_tx(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn


def insert_for(conn: Connection) -> Any:
    """`insert` with `.on_conflict_do_update(...)`, for the connection's dialect."""
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


@contextmanager
def startup_lock(engine: Engine) -> Iterator[Connection]:
    """Serialize start-up work (migrations, bootstrap) across replicas of one database."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            conn.commit()
            try:
                yield conn
            finally:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
                conn.commit()
        return
    db = engine.url.database
    if not db or db == ":memory:":
        with engine.connect() as conn:
            yield conn
        return
    with open(f"{db}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def alembic_config(conn: Connection | None = None, url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["connection"] = conn
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """`alembic upgrade head`, safe to call from every replica at start-up."""
    with startup_lock(engine) as conn:
        command.upgrade(alembic_config(conn), revision)
        conn.commit()


def downgrade(engine: Engine, revision: str = "base") -> None:
    with startup_lock(engine) as conn:
        command.downgrade(alembic_config(conn), revision)
        conn.commit()
