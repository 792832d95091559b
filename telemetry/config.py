"""Typed telemetry settings: the `telemetry:` section of the app's args (AppConfig.telemetry)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TenantLabelConfig(BaseModel):
    """Which tenants get their own `tenant` label value in metrics (telemetry/tenant_label.py);
    all others are labelled `plan:<plan>`, so the label set stays bounded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    named_tenants: list[str] = Field(
        default_factory=list, description="Always labelled by name (your top-N tenants), on every replica.")
    named_plans: list[str] = Field(
        default_factory=lambda: ["enterprise"], description="Tenants on these plans are labelled by name, first "
        "come, up to max_named per process ('*': any plan).")
    max_named: int = Field(20, ge=0, le=1000, description="Cap of names given through named_plans per process.")


class TelemetryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP collector, e.g. http://otel-collector:4318 (`/v1/traces` is added when the "
        "URL has no path). Unset: no exporter, OpenTelemetry's no-op tracer.")
    service_name: str = Field("genserve", min_length=1, description="`service.name` of every span.")
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of new traces kept (parent-based).")
    json_logs: bool = Field(True, description="genserve's loggers write JSON lines (with request_id and tenant).")
    access_log: bool = Field(True, description="One log line per HTTP request from the ingress.")
    tenant_label: TenantLabelConfig = Field(default_factory=TenantLabelConfig,
                                            description="Bounded `tenant` label of the metrics.")

    @field_validator("otlp_endpoint", mode="before")
    @classmethod
    def _blank_is_none(cls, v: object) -> object:
        # `${OTEL_EXPORTER_OTLP_ENDPOINT:-}` in a Serve config expands to "" when the variable is unset.
        if isinstance(v, str) and not v.strip():
            return None
        if isinstance(v, str) and not v.startswith(("http://", "https://")):
            raise ValueError(f"otlp_endpoint must be an http(s) URL, got {v!r}")
        return v


def telemetry_of(cfg: object) -> TelemetryConfig:
    """`cfg.telemetry` of an AppConfig, defaults when the config has no such section."""
    value = getattr(cfg, "telemetry", None)
    if value is None:
        return TelemetryConfig()
    return value if isinstance(value, TelemetryConfig) else TelemetryConfig.model_validate(value)
