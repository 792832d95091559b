"""Typed result-storage settings (the `storage:` block of the app args).

Secrets default from the environment so they stay out of YAML: GENSERVE_URL_SIGNING_KEY for the
local backend's URL signatures, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN /
AWS_DEFAULT_REGION for S3 (unset = boto3's own credential chain, e.g. an IAM role).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


def _env_secret(name: str) -> SecretStr | None:
    value = os.environ.get(name)
    return SecretStr(value) if value else None


class LocalStorageConfig(_Strict):
    dir: str = Field("{work_dir}/results", description="Where files live; `{work_dir}` is AppConfig.work_dir.")
    signing_key: SecretStr | None = Field(
        default_factory=lambda: _env_secret("GENSERVE_URL_SIGNING_KEY"),
        description="HMAC key of file URLs (env GENSERVE_URL_SIGNING_KEY; unset = a random key kept in "
        "{work_dir}/url_signing_key, shared by the replicas of one node). Replicas on several nodes "
        "must share one explicit key.",
    )
    url_expiry_s: int = Field(3600, ge=1, le=7 * 24 * 3600, description="Lifetime of a signed file URL.")
    public_base_url: str | None = Field(
        None, description="Origin of file URLs, e.g. https://img.example.com; unset = the app's public_base_url "
        "(never the request's Host header).")

    def resolved_dir(self, work_dir: Path) -> Path:
        return Path(self.dir.replace("{work_dir}", str(Path(work_dir).resolve()))).expanduser()


class S3StorageConfig(_Strict):
    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = Field("", description="Prepended to every key, e.g. `genserve/`.")
    endpoint_url: str | None = Field(None, description="For S3-compatible stores (MinIO, R2, Ceph...).")
    region: str | None = Field(default_factory=lambda: os.environ.get("AWS_DEFAULT_REGION") or None)
    access_key_id: SecretStr | None = Field(default_factory=lambda: _env_secret("AWS_ACCESS_KEY_ID"))
    secret_access_key: SecretStr | None = Field(default_factory=lambda: _env_secret("AWS_SECRET_ACCESS_KEY"))
    session_token: SecretStr | None = Field(default_factory=lambda: _env_secret("AWS_SESSION_TOKEN"))
    url_expiry_s: int = Field(3600, ge=1, le=7 * 24 * 3600, description="Presigned GET lifetime (SigV4 max: 7 days).")
    addressing_style: Literal["auto", "virtual", "path"] = Field(
        "auto", description="`path` for most S3-compatible servers on a bare host:port.")
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> S3StorageConfig:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("s3.access_key_id and s3.secret_access_key must be given together (or neither)")
        if self.prefix.startswith("/"):
            raise ValueError(f"s3.prefix ({self.prefix!r}) must not start with '/'")
        return self


class StorageConfig(_Strict):
    backend: Literal["local", "s3"] = "local"
    local: LocalStorageConfig = Field(default_factory=LocalStorageConfig)
    s3: S3StorageConfig | None = None
    put_attempts: int = Field(4, ge=1, le=20, description="Tries per upload before StorageError.")
    retry_backoff_s: float = Field(0.25, ge=0.0, le=30.0, description="First retry delay; doubles each time.")

    @model_validator(mode="after")
    def _check_backend(self) -> StorageConfig:
        if self.backend == "s3" and self.s3 is None:
            raise ValueError("storage.backend is 's3' but storage.s3 (bucket, ...) is not set")
        return self
