"""Privacy defaults of the app database (issue 17, finding 8): a new SQLite file is 0600, and with
no key_pepper configured a new database gets a random pepper kept beside it (0600), reused on
restart; an existing database whose keys were hashed with the empty pepper keeps working."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve_app.tenancy import Tenancy, TenancyConfig, store
from serve_app.tenancy import keys as keylib
from serve_app.tenancy.db import make_engine, upgrade


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def no_env_pepper(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("GENSERVE_KEY_PEPPER", raising=False)
    old = os.umask(0o022)  # the usual umask: SQLite alone would create 0644 files under it
    yield
    os.umask(old)


def _config(db: Path, **kw: object) -> TenancyConfig:
    return TenancyConfig(database_url=f"sqlite:///{db}", local_tenant={"enabled": False}, **kw)


def test_new_database_is_private_and_gets_a_pepper_that_survives_restart(tmp_path: Path, no_env_pepper: None) -> None:
    db = tmp_path / "data" / "genserve.db"
    t = Tenancy(_config(db), work_dir=tmp_path)
    pepper_file = db.with_name("genserve.db.pepper")
    assert _mode(db) == 0o600 and _mode(pepper_file) == 0o600
    t.create_tenant("acme", "free")
    key = t.create_key("acme").key
    for wal in (db.with_name("genserve.db-wal"), db.with_name("genserve.db-shm")):
        if wal.exists():
            assert _mode(wal) & 0o077 == 0, (wal, oct(_mode(wal)))
    t.close()
    pepper = pepper_file.read_text().strip()
    assert len(pepper) == 64
    assert keylib.hash_key(key, pepper) != keylib.hash_key(key, "")

    again = Tenancy(_config(db), work_dir=tmp_path)  # a restart: same file, same pepper, the key still works
    try:
        assert again.authenticate_sync(key).tenant == "acme"
        assert pepper_file.read_text().strip() == pepper
    finally:
        again.close()


def test_existing_database_with_empty_pepper_keys_keeps_them_valid(tmp_path: Path, no_env_pepper: None) -> None:
    db = tmp_path / "genserve.db"
    cfg = _config(db)
    engine = make_engine(cfg.database_url)  # what an older version left: keys hashed without a pepper
    upgrade(engine)
    store.create_tenant(engine, cfg, "old", "free")
    key = store.create_key(engine, "", "old").key
    engine.dispose()
    t = Tenancy(cfg, work_dir=tmp_path)
    try:
        assert t.authenticate_sync(key).tenant == "old"
        assert not db.with_name("genserve.db.pepper").exists()
    finally:
        t.close()


def test_configured_pepper_wins_and_no_file_is_written(tmp_path: Path, no_env_pepper: None) -> None:
    db = tmp_path / "genserve.db"
    t = Tenancy(_config(db, key_pepper="from-config"), work_dir=tmp_path)
    try:
        t.create_tenant("acme", "free")
        key = t.create_key("acme").key
        assert not db.with_name("genserve.db.pepper").exists()
        [info] = store.list_keys(t.engine, "acme")
        assert t.authenticate_sync(key).tenant == "acme" and info.prefix == keylib.key_prefix(key)
    finally:
        t.close()


def test_existing_database_file_keeps_its_mode(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    db.touch(mode=0o640)
    os.chmod(db, 0o640)
    make_engine(f"sqlite:///{db}").dispose()
    assert _mode(db) == 0o640
