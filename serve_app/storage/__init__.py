"""Where generated images live: one `ResultStore` interface, local files or S3 (issue 5).

    store = build_store(cfg.storage, work_dir=cfg.work_dir, public_base_url=cfg.public_base_url)  # one per replica
    Services(..., storage=store); app.include_router(files_router)
    key = await store.aput(result_key(ctx.tenant_id), png_bytes)   # StorageError after retries
    url = store.url(key)          # origin: storage.local.public_base_url, else the app's public_base_url
"""

from __future__ import annotations

from pathlib import Path

from serve_app.storage.base import (
    InvalidKeyError,
    ResultStore,
    StorageError,
    new_result_id,
    result_key,
    validate_key,
)
from serve_app.storage.config import LocalStorageConfig, S3StorageConfig, StorageConfig
from serve_app.storage.local import LocalResultStore
from serve_app.storage.router import files_router, get_store
from serve_app.storage.s3 import S3ResultStore
from serve_app.storage.secrets import persisted_secret


def build_store(cfg: StorageConfig, work_dir: Path | str, *, public_base_url: str | None = None) -> ResultStore:
    """`public_base_url`: the app's public origin (AppConfig.public_base_url), used for file URLs
    unless `storage.local.public_base_url` names another (e.g. a CDN in front of /files)."""
    if cfg.backend == "s3":
        assert cfg.s3 is not None  # checked by StorageConfig
        return S3ResultStore(cfg.s3, put_attempts=cfg.put_attempts, retry_backoff_s=cfg.retry_backoff_s)
    local = cfg.local
    key = (local.signing_key.get_secret_value().encode() if local.signing_key is not None
           else persisted_secret(Path(work_dir) / "url_signing_key"))
    return LocalResultStore(local.resolved_dir(Path(work_dir)), signing_key=key, url_expiry_s=local.url_expiry_s,
                            public_base_url=local.public_base_url or public_base_url, put_attempts=cfg.put_attempts,
                            retry_backoff_s=cfg.retry_backoff_s)


__all__ = [
    "InvalidKeyError", "LocalResultStore", "LocalStorageConfig", "ResultStore", "S3ResultStore",
    "S3StorageConfig", "StorageConfig", "StorageError", "build_store", "files_router", "get_store",
    "new_result_id", "persisted_secret", "result_key", "validate_key",
]
