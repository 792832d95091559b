"""Webhook settings (the `webhooks:` block of the app args) and `WebhookSender`, which binds
them to the secret and the delivery log so a caller only passes the URL and the payload."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from sqlalchemy import Engine

from serve_app.netguard import Resolver
from serve_app.storage.secrets import persisted_secret
from serve_app.webhooks.delivery import deliver
from serve_app.webhooks.log import DeliveryLog
from serve_app.webhooks.urls import acheck_webhook_url, check_webhook_url_blocking, webhook_guard


class WebhookConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    secret: SecretStr | None = Field(
        default_factory=lambda: SecretStr(os.environ["GENSERVE_WEBHOOK_SECRET"])
        if os.environ.get("GENSERVE_WEBHOOK_SECRET") else None,
        description="HMAC key of X-Genserve-Signature (env GENSERVE_WEBHOOK_SECRET; unset = a random key "
        "kept in {work_dir}/webhook_secret). Receivers need it to verify: set it explicitly.")
    allow_private: bool = Field(False, description="Allow loopback/private/link-local targets (internal setups).")
    allow_hosts: list[str] = Field(default_factory=list,
                                   description="Host names, IPs or CIDRs allowed even if private, e.g. 10.1.0.0/16.")
    attempts: int = Field(5, ge=1, le=20)
    backoff_s: float = Field(1.0, ge=0.0, le=600.0, description="First retry delay; doubles each attempt.")
    max_backoff_s: float = Field(300.0, ge=0.0)
    timeout_s: float = Field(10.0, gt=0.0, le=120.0, description="Per attempt.")


class WebhookSender:
    def __init__(self, cfg: WebhookConfig, *, work_dir: Path | str, engine: Engine,
                 resolver: Resolver | None = None) -> None:
        self.cfg = cfg
        self.secret = (cfg.secret.get_secret_value().encode() if cfg.secret is not None
                       else persisted_secret(Path(work_dir) / "webhook_secret"))
        self.log = DeliveryLog(engine)
        # One guard (serve_app/netguard) checks the URL at job submit and again at each delivery.
        self.guard = webhook_guard(allow_private=cfg.allow_private, allow_hosts=cfg.allow_hosts, resolver=resolver)

    def validate(self, url: str) -> None:
        check_webhook_url_blocking(url, self.guard)

    async def avalidate(self, url: str) -> None:
        await acheck_webhook_url(url, self.guard)

    async def send(self, url: str, payload: dict[str, Any], *, job_id: str | None = None) -> bool:
        c = self.cfg
        return await deliver(url, payload, secret=self.secret, attempts=c.attempts, backoff_s=c.backoff_s,
                             timeout_s=c.timeout_s, max_backoff_s=c.max_backoff_s, record=self.log.arecord,
                             job_id=job_id, guard=self.guard)
