"""Typed tenancy settings: plans, prices, storage URLs and secrets (the `tenancy:` args block).

Secrets default from the environment so they stay out of YAML files: `GENSERVE_ADMIN_TOKEN`,
`GENSERVE_KEY_PEPPER`. They are `SecretStr`, so a logged config never shows them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlanConfig(_Strict):
    """What a tenant on this plan may do. `None` means unlimited."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    allowed_models: list[str] | Literal["*"] = Field("*", description="Model names (or aliases), or '*'.")
    requests_per_minute: int | None = Field(60, ge=1, description="Per rate window (see rate_window_s).")
    tokens_per_minute: int | None = Field(40_000, ge=1)
    images_per_minute: int | None = Field(10, ge=1)
    max_concurrent_requests: int | None = Field(4, ge=1)
    max_image_side: int | None = Field(1024, ge=8)
    max_steps: int | None = Field(50, ge=1)
    monthly_budget_usd: float | None = Field(10.0, ge=0.0)
    priority: int = Field(0, description="Higher is more important; the top plan is used for `local`.")
    adaptive_quality: bool = Field(False, description="Requests without `quality` may get fewer steps under "
                                   "load (`quality: \"auto\"` opts in on any plan; --q/steps never degrade).")

    png_metadata: bool = Field(False, description="Default of a request's `metadata`: write prompt, negative "
                               "prompt, seed and settings into result PNGs as text chunks (readable by anyone "
                               "holding a result URL, hence off by default).")

    max_adapters: int | None = Field(10, ge=0, description="LoRA adapters a tenant may hold (private ones; "
                                     "None: unlimited, 0: none).")
    global_adapters: bool = Field(True, description="Whether the tenant may use global (admin-registered) adapters.")

    def allows(self, model: str) -> bool:
        return self.allowed_models == "*" or model in self.allowed_models


class PricesConfig(_Strict):
    """Prices used for the cost estimate and the budget (USD)."""

    per_1k_prompt_tokens: float = Field(0.0005, ge=0.0)
    per_1k_completion_tokens: float = Field(0.0015, ge=0.0)
    per_image: float = Field(0.01, ge=0.0)
    per_gpu_second: float = Field(0.0, ge=0.0, description="0 = GPU time is recorded but not billed.")


class GpuCostConfig(_Strict):
    """What one GPU-hour costs *us*, per model (not what tenants pay: that is `prices`). Measured
    GPU-seconds × this rate / 3600 give the GPU cost that `genserve usage`, `/v1/usage`, billing
    statements and the dashboard show per 1k tokens and per image. LLM GPU-seconds are the share
    clock's (deployments/llm/share_clock.py) × the replica's num_gpus; image GPU-seconds are each
    image's share of its batch's compute time × the replica's num_gpus (docs/tenancy.md#cost)."""

    usd_per_gpu_hour: dict[str, Annotated[float, Field(ge=0.0)]] = Field(
        default_factory=dict, description="Canonical model name (not an alias) -> USD per GPU-hour of the GPU it "
        "runs on, e.g. {sdxl: 2.5, qwen-7b: 2.5}. On CPU replicas GPU-seconds are replica-seconds.")
    default_usd_per_gpu_hour: float = Field(0.0, ge=0.0, description="For models not listed (0: no GPU cost).")

    def rate(self, model: str) -> float:
        """USD per GPU-hour of `model`."""
        return self.usd_per_gpu_hour.get(model, self.default_usd_per_gpu_hour)


class LocalTenantConfig(_Strict):
    """The tenant `make run` creates so the quick start works without an admin step."""

    enabled: bool = True
    name: str = "local"
    plan: str | None = Field(None, description="Default: the plan with the highest priority.")
    key_file: str = Field("{work_dir}/local_api_key", description="Where the key is written (chmod 600).")


def _default_plans() -> list[PlanConfig]:
    return [
        PlanConfig(name="free", requests_per_minute=20, tokens_per_minute=10_000, images_per_minute=5,
                   max_concurrent_requests=2, max_image_side=1024, max_steps=30, monthly_budget_usd=5.0,
                   priority=0, max_adapters=2),
        PlanConfig(name="pro", requests_per_minute=300, tokens_per_minute=200_000, images_per_minute=60,
                   max_concurrent_requests=16, max_image_side=1536, max_steps=80, monthly_budget_usd=500.0,
                   priority=1, max_adapters=50),
        PlanConfig(name="enterprise", requests_per_minute=3000, tokens_per_minute=2_000_000,
                   images_per_minute=600, max_concurrent_requests=128, max_image_side=2048, max_steps=150,
                   monthly_budget_usd=None, priority=2, max_adapters=None),
    ]


def _env_secret(name: str) -> SecretStr | None:
    value = os.environ.get(name)
    return SecretStr(value) if value else None


class TenancyConfig(_Strict):
    # Inputs stay out of validation errors: a database URL may carry a password.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    database_url: str = Field(
        "sqlite:///{work_dir}/genserve.db",
        description="SQLAlchemy URL; `{work_dir}` is replaced by AppConfig.work_dir. Postgres: "
        "postgresql+psycopg://user@host/db.",
    )
    redis_url: str | None = Field(None, description="If set, rate/concurrency counters live in Redis.")
    admin_token: SecretStr | None = Field(
        default_factory=lambda: _env_secret("GENSERVE_ADMIN_TOKEN"),
        description="Bearer token of /admin/ (default: env GENSERVE_ADMIN_TOKEN; unset = admin API off).",
    )
    key_pepper: SecretStr = Field(
        default_factory=lambda: _env_secret("GENSERVE_KEY_PEPPER") or SecretStr(""),
        description="HMAC key for API-key hashes (env GENSERVE_KEY_PEPPER). Changing it voids all keys. Unset: a "
        "new SQLite database gets a random one kept beside it (<db>.pepper, 0600); see tenancy/pepper.py.",
    )
    plans: list[PlanConfig] = Field(default_factory=_default_plans, min_length=1)
    default_plan: str = "free"
    prices: PricesConfig = Field(default_factory=PricesConfig)
    gpu_cost: GpuCostConfig = Field(default_factory=GpuCostConfig)
    rate_window_s: int = Field(60, ge=1, le=3600, description="Fixed window of the per-minute limits.")
    lease_ttl_s: int = Field(
        60, ge=2, le=3600, description="Lifetime of a concurrency slot's or budget hold's lease. A running "
        "request renews it (lease_renew_s); one whose process stopped renewing (crash, leak) is freed this "
        "long after its last renewal.",
    )
    lease_renew_s: float | None = Field(
        None, gt=0, description="How often a replica renews the leases of its open requests and sweeps expired "
        "ones (default: lease_ttl_s / 3, so two renewals may fail before a running request's lease lapses).",
    )
    auth_cache_s: float = Field(2.0, ge=0.0, description="Per-replica cache of key lookups; revocation "
                                "reaches other replicas within this time.")
    auth_stale_s: float = Field(60.0, ge=0.0, description="After auth_cache_s, a cached key is still "
                                "answered at once for this long while it is re-checked in the background "
                                "(so a revocation elsewhere may let one more request through per replica).")
    admission_overlap: bool = Field(True, description="A streamed chat request starts on the LLM replica while "
                                    "its admission is decided; a refusal cancels it before any token is sent "
                                    "(tenancy/overlap.py bounds the thrown-away work).")
    pool_size: int = Field(10, ge=1, description="DB connections per process (Postgres).")
    local_tenant: LocalTenantConfig = Field(default_factory=LocalTenantConfig)

    @field_validator("redis_url", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        # `${GENSERVE_REDIS_URL:-}` in a Serve config expands to "" when the variable is unset.
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        if not v.startswith(("sqlite:", "postgresql")):
            raise ValueError(f"database_url ({v.split('@')[-1]!r}) must be a sqlite: or postgresql URL")
        return v

    @model_validator(mode="after")
    def _check_plans(self) -> TenancyConfig:
        names = [p.name for p in self.plans]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"plan names must be unique; repeated: {dupes}")
        if self.default_plan not in names:
            raise ValueError(f"default_plan ({self.default_plan!r}) is not one of plans ({names})")
        if self.lease_renew_s is not None and self.lease_renew_s >= self.lease_ttl_s:
            raise ValueError(f"lease_renew_s ({self.lease_renew_s}) must be below lease_ttl_s ({self.lease_ttl_s}), "
                             "or running requests would lose their slots")
        if self.local_tenant.plan is not None and self.local_tenant.plan not in names:
            raise ValueError(f"local_tenant.plan ({self.local_tenant.plan!r}) is not one of plans ({names})")
        return self

    @property
    def lease_renew_every_s(self) -> float:
        return self.lease_renew_s if self.lease_renew_s is not None else self.lease_ttl_s / 3

    def plan(self, name: str) -> PlanConfig | None:
        return next((p for p in self.plans if p.name == name), None)

    @property
    def top_plan(self) -> PlanConfig:
        # Highest priority; on a tie the later one (lists usually go cheap → expensive).
        return max(reversed(self.plans), key=lambda p: p.priority)

    def resolved_database_url(self, work_dir: Path) -> str:
        return self.database_url.replace("{work_dir}", str(Path(work_dir).resolve()))

    def resolved_key_file(self, work_dir: Path) -> Path:
        return Path(self.local_tenant.key_file.replace("{work_dir}", str(Path(work_dir).resolve())))
