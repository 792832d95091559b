"""The `adapters:` block of the app config (issue 21)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class AdaptersConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_upload_mb: float = Field(512.0, gt=0, description="Largest adapter archive accepted (and its inflated "
                                 "size), in MiB. Larger uploads get 413/400 before anything is stored.")
    max_rank: int = Field(128, ge=1, le=1024, description="Largest LoRA rank `r` accepted on upload.")
    cache_dir: str = Field("{work_dir}/adapters", description="Where replicas and the ingress unpack adapters, "
                           "one directory per adapter id (content-addressed, never stale).")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def resolved_cache_dir(self, work_dir: Path) -> Path:
        return Path(self.cache_dir.replace("{work_dir}", str(work_dir)))
