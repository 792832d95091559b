"""The bot's settings, read from the environment once at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


def _number(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {raw!r}")
    return value


@dataclass(frozen=True)
class BotSettings:
    telegram_token: str
    genserve_url: str
    api_key: str
    # A Bot API server other than api.telegram.org (a local one, or a fake one in tests).
    telegram_api_base: str | None = None
    poll_interval_s: float = 1.0
    job_timeout_s: float = 600.0
    # In-bot limit per Telegram user, before the tenant's own limits at genserve.
    user_jobs_per_window: int = 5
    user_window_s: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BotSettings:
        env = os.environ if env is None else env
        missing = [n for n in ("TELEGRAM_BOT_TOKEN", "GENSERVE_URL", "GENSERVE_API_KEY") if not env.get(n)]
        if missing:
            raise ValueError(f"missing environment variable(s): {', '.join(missing)}")
        url = env["GENSERVE_URL"].rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"GENSERVE_URL must start with http:// or https://, got {env['GENSERVE_URL']!r}")
        return cls(
            telegram_token=env["TELEGRAM_BOT_TOKEN"],
            genserve_url=url,
            api_key=env["GENSERVE_API_KEY"],
            telegram_api_base=env.get("TELEGRAM_API_BASE") or None,
            poll_interval_s=_number(env, "GENSERVE_BOT_POLL_S", 1.0, 0.05),
            job_timeout_s=_number(env, "GENSERVE_BOT_JOB_TIMEOUT_S", 600.0, 1.0),
            user_jobs_per_window=int(_number(env, "GENSERVE_BOT_USER_JOBS", 5, 1)),
            user_window_s=_number(env, "GENSERVE_BOT_USER_WINDOW_S", 60.0, 1.0),
        )
