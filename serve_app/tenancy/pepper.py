"""The key pepper (HMAC key of API-key hashes) when none is configured.

A NEW SQLite database gets a random pepper on first start, kept beside the database file
(`<db>.pepper`, mode 0600) and reused on every restart, so a copied database alone does not let
anyone test guessed keys offline. A database that already holds keys but has no pepper file was
made by an older version with the empty pepper: it keeps the empty pepper (a warning says so),
because a new pepper would void every key issued. Postgres (shared by replicas on many nodes, with
no common file system) needs `key_pepper` / GENSERVE_KEY_PEPPER set explicitly.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Engine, func, inspect, select

from serve_app.storage.secrets import persisted_secret
from serve_app.tenancy.config import TenancyConfig
from serve_app.tenancy.db import startup_lock
from serve_app.tenancy.models import ApiKey

logger = logging.getLogger("genserve.tenancy")


def pepper_file(engine: Engine) -> Path | None:
    """`<db>.pepper` for a SQLite file database, None otherwise."""
    db = engine.url.database
    if engine.dialect.name != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db).with_name(Path(db).name + ".pepper")


def _has_keys(engine: Engine) -> bool:
    with engine.connect() as conn:
        if not inspect(conn).has_table(ApiKey.__tablename__):
            return False
        return bool(conn.execute(select(func.count()).select_from(ApiKey)).scalar())


def resolve_pepper(config: TenancyConfig, engine: Engine) -> str:
    configured = config.key_pepper.get_secret_value()
    if configured:
        return configured
    path = pepper_file(engine)
    if path is None:
        logger.warning("tenancy.key_pepper (GENSERVE_KEY_PEPPER) is not set: API keys are hashed without a pepper. "
                       "Set one before issuing keys (changing it later voids them).")
        return ""
    if path.exists():
        return persisted_secret(path).decode()
    with startup_lock(engine):  # replicas starting together agree on "new database" and on one pepper
        if not path.exists() and _has_keys(engine):
            logger.warning("database %s holds API keys hashed without a pepper and has no %s: keeping the empty "
                           "pepper so they stay valid (set key_pepper and re-issue keys to add one)",
                           engine.url.database, path.name)
            return ""
        return persisted_secret(path).decode()
