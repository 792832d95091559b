"""Structured JSON logs with the request id and tenant, and no secrets.

`install_logging(component)` (ingress and every model replica, at start-up) gives the `genserve`
logger of a Serve replica one handler: a file `logs/serve/genserve_<deployment>_<replica>.log` in
Ray's session directory (beside Serve's own replica logs, where log shippers already look).
Outside a replica (CLI, tests, Serve's local testing mode) the host program's logging config is
left alone; `JsonFormatter` and `RedactingFilter` can be attached to any handler. Each line is one JSON object: ts, level, logger, msg, component, replica,
request_id, tenant, model, trace_id/span_id when a span is current, `exc` for tracebacks, and
any `extra={"fields": {...}}`. Everything written goes through `redact` (API keys, bearer tokens,
X-API-Key values, passwords in URLs), and so do the records of Serve's own replica logger.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
from datetime import UTC, datetime
from pathlib import Path

from opentelemetry import trace

from telemetry.context import current_request

REDACTED = "[REDACTED]"
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # genserve API keys (serve_app/tenancy/keys.py): `gsk_` + 43 url-safe characters.
    (re.compile(r"gsk_[A-Za-z0-9_-]{8,}"), "gsk_" + REDACTED),
    # `Authorization: Bearer X`, `'authorization': 'Bearer X'`.
    (re.compile(r"(?i)\b(bearer)(\s+)[A-Za-z0-9._~+/=-]+"), r"\1\2" + REDACTED),
    # `X-API-Key: X`, `"x-api-key": "X"`, `x_api_key=X`, `api_key=X`, `token=X`, `password=X`.
    (re.compile(r"(?i)\b((?:x[-_])?api[-_]?key|token|secret|password|passwd)(\W{0,3}?[:=]\s*[\"']?)"
                r"[^\s\"',;&}]+"), r"\1\2" + REDACTED),
    # URLs with credentials: postgresql://user:PASSWORD@host, redis://:PASSWORD@host.
    (re.compile(r"\b([a-z][a-z0-9+.-]*://[^:/@\s\"']*):[^@\s\"'/]+@"), r"\1:" + REDACTED + "@"),
)


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record's message and traceback with secrets redacted (for any handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str, replica: str | None = None) -> None:
        super().__init__()
        self.component = component
        self.replica = replica

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "component": self.component,
        }
        if self.replica:
            out["replica"] = self.replica
        info = current_request()
        if info is not None:
            out["request_id"] = info.request_id
            if info.tenant:
                out["tenant"] = info.tenant
            if info.model:
                out["model"] = info.model
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"], out["span_id"] = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        return redact(json.dumps(out, default=str, ensure_ascii=False))


def _replica_identity() -> tuple[str, str] | None:
    """(deployment, replica id) inside a Serve replica actor, else None."""
    try:
        import ray
        from ray import serve

        if ray._private.worker.global_worker.mode != ray.WORKER_MODE:  # local testing mode, drivers
            return None
        ctx = serve.get_replica_context()
    except Exception:  # noqa: BLE001 - not in a replica (CLI, tests, local testing mode)
        return None
    return ctx.deployment, ctx.replica_id.unique_id


def _serve_logs_dir() -> Path | None:
    try:
        from ray.serve._private.logging_utils import get_serve_logs_dir

        return Path(get_serve_logs_dir())
    except Exception:  # noqa: BLE001 - Ray not initialized in this process
        return None


_MARK = "_genserve_handler"


def install_logging(component: str, *, json_logs: bool = True, level: int = logging.INFO) -> str | None:
    """In a Serve replica, route the `genserve` loggers to one redacting file handler
    (idempotent per process). Returns the log file's path, None outside a replica."""
    logger = logging.getLogger("genserve")
    for h in logger.handlers:
        if getattr(h, _MARK, False):
            return getattr(h, "baseFilename", None)
    identity = _replica_identity()
    logs_dir = _serve_logs_dir() if identity is not None else None
    if identity is None or logs_dir is None:
        return None
    logs_dir.mkdir(parents=True, exist_ok=True)
    path = str(logs_dir / re.sub(r"[^A-Za-z0-9_.-]", "_", f"genserve_{identity[0]}_{identity[1]}.log"))
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=512 * 1024 * 1024, backupCount=5)
    handler.setFormatter(JsonFormatter(component, identity[1]) if json_logs else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    setattr(handler, _MARK, True)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # else also printed (unformatted) through Serve's stderr redirect
    for h in logging.getLogger("ray.serve").handlers:  # Serve's own replica log, same rules
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(RedactingFilter())
    return path
