"""The `local` tenant of the quick start: created once, its key written to a 0600 file."""

from __future__ import annotations

import os
from pathlib import Path

from serve_app.tenancy import store
from serve_app.tenancy.db import startup_lock
from serve_app.tenancy.service import Tenancy


def ensure_local_tenant(tenancy: Tenancy, key_file: Path | None = None) -> str | None:
    """Create the local tenant (top plan) and a key if it has no usable one; write the key to
    `key_file` (mode 0600) and return it. Returns None when a usable key already exists.
    Runs under the start-up lock, so replicas starting together create one key, not two."""
    cfg = tenancy.config.local_tenant
    key_file = Path(key_file) if key_file is not None else tenancy.config.resolved_key_file(tenancy.work_dir)
    plan = cfg.plan or tenancy.config.top_plan.name
    with startup_lock(tenancy.engine):
        names = {t.name for t in tenancy.list_tenants()}
        if cfg.name not in names:
            tenancy.create_tenant(cfg.name, plan)
        elif store.has_active_key(tenancy.engine, cfg.name):
            return None
        created = tenancy.create_key(cfg.name, label="local (created at start-up)")
        key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(created.key + "\n")
        os.chmod(key_file, 0o600)  # O_CREAT's mode doesn't apply to an existing file
        return created.key
