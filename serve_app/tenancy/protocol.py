"""Pydantic shapes of the tenancy HTTP API (admin and /v1/usage) and of the service's results."""

from __future__ import annotations

from datetime import date, datetime

from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantCreate(_In):
    name: str = Field(pattern=NAME_PATTERN, description="Lower-case letters, digits, '_', '.', '-'.")
    plan: str | None = Field(None, description="Default: the config's default_plan.")


class TenantUpdate(_In):
    plan: str


class KeyCreate(_In):
    label: str | None = Field(None, max_length=128)
    expires_at: datetime | None = Field(None, description="Timezone-aware; naive values are read as UTC.")
    expires_in_days: float | None = Field(None, gt=0)


class TenantInfo(BaseModel):
    object: str = "tenant"
    name: str
    plan: str
    created_at: datetime


class KeyInfo(BaseModel):
    object: str = "api_key"
    prefix: str
    tenant: str
    label: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class CreatedKey(KeyInfo):
    key: str = Field(description="The secret. Shown once: only its hash is stored.")


class UsageTotals(BaseModel):
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    images: int = 0
    gpu_seconds: float = 0.0
    cost_usd: float = Field(0.0, description="The priced amount (tenancy.prices): what the tenant is charged.")
    gpu_cost_usd: float = Field(0.0, description="Measured GPU-seconds × the model's tenancy.gpu_cost rate.")
    gpu_cost_per_1k_tokens_usd: float | None = Field(
        None, description="GPU cost of the token (chat, completions, prompt expansion) usage per 1k tokens.")
    price_per_1k_tokens_usd: float | None = Field(None, description="Priced amount of that usage per 1k tokens.")
    gpu_cost_per_image_usd: float | None = Field(None, description="GPU cost of the image usage per image.")
    price_per_image_usd: float | None = Field(None, description="Priced amount of that usage per image.")


class UsageDay(UsageTotals):
    day: date


class ModelUsage(UsageTotals):
    model: str


class UsageReport(BaseModel):
    object: str = "usage_report"
    tenant: str
    since: date
    until: date
    totals: UsageTotals
    days: list[UsageDay]
    by_model: list[ModelUsage]


class BudgetStatus(BaseModel):
    period: str
    monthly_budget_usd: float | None
    spent_usd: float
    reserved_usd: float
    remaining_usd: float | None


class UsageSummary(BaseModel):
    object: str = "usage"
    tenant: str
    plan: str
    today: UsageTotals
    month: UsageTotals
    budget: BudgetStatus
