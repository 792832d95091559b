"""Signed, retried webhooks for finished jobs, with every attempt recorded (issue 5).

    sender = WebhookSender(cfg.webhooks, work_dir=cfg.work_dir, engine=tenancy.engine)
    await sender.avalidate(body.webhook_url)           # at POST /v1/jobs: 400 naming webhook_url
    ok = await sender.send(url, job_json, job_id=job.id)   # on a terminal state
"""

from serve_app.webhooks.config import WebhookConfig, WebhookSender
from serve_app.webhooks.delivery import DeliveryAttempt, Recorder, deliver, encode_payload
from serve_app.webhooks.log import DeliveryLog
from serve_app.webhooks.signing import SIGNATURE_HEADER, sign, signature_header, verify_signature
from serve_app.webhooks.urls import avalidate_webhook_url, validate_webhook_url

__all__ = [
    "SIGNATURE_HEADER", "DeliveryAttempt", "DeliveryLog", "Recorder", "WebhookConfig", "WebhookSender",
    "avalidate_webhook_url", "deliver", "encode_payload", "sign", "signature_header", "validate_webhook_url",
    "verify_signature",
]
