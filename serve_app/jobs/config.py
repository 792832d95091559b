from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from serve_app.webhooks.config import WebhookConfig


class JobsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    lease_s: float = Field(15.0, ge=1.0, description="A running job's owner must renew within this time.")
    heartbeat_s: float = Field(3.0, gt=0.0, description="How often owners renew leases.")
    cancel_poll_s: float = Field(0.25, gt=0.0, description=(
        "How often a replica running jobs reads their cancel flags: a DELETE that landed on another "
        "replica reaches the model within this time (one read by primary key; only while jobs run)."))
    reap_interval_s: float = Field(2.0, gt=0.0, description="How often each replica looks for expired leases.")
    max_attempts: int = Field(3, ge=1, le=20, description="Runs of one job before it fails with a reason.")
    retry_backoff_s: float = Field(1.0, ge=0.0)
    max_backlog: int = Field(1000, ge=1, description="Queued+running jobs above which POST /v1/jobs gets 503.")
    default_seconds_per_image: float = Field(5.0, gt=0.0, description="ETA before any job has finished.")
    preview_max_bytes: int = Field(1 << 20, ge=1024, le=16 << 20, description=(
        "Largest partial image (PNG bytes) stored as a running job's preview (GET /v1/jobs/{id}/preview); "
        "a larger one is skipped. The replica downscales previews first (the model's previews.max_side)."))
    webhooks: WebhookConfig = Field(default_factory=WebhookConfig)
