"""Tenancy config validation and the plan helpers the routes call."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.errors import APIError
from serve_app.tenancy import (
    PlanConfig,
    TenancyConfig,
    TenantContext,
    ensure_model_allowed,
    ensure_within_plan,
    visible_models,
)


def test_defaults_and_secrets_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENSERVE_ADMIN_TOKEN", "s3cr3t-admin")
    monkeypatch.setenv("GENSERVE_KEY_PEPPER", "s3cr3t-pepper")
    cfg = TenancyConfig()
    assert [p.name for p in cfg.plans] == ["free", "pro", "enterprise"] and cfg.top_plan.name == "enterprise"
    assert cfg.admin_token is not None and cfg.admin_token.get_secret_value() == "s3cr3t-admin"
    assert "s3cr3t" not in repr(cfg)
    assert cfg.resolved_database_url("/srv/w") == "sqlite:////srv/w/genserve.db"
    assert cfg.rate_window_s == 60 and cfg.redis_url is None


@pytest.mark.parametrize("raw, needle", [
    ({"plans": [{"name": "a"}, {"name": "a"}], "default_plan": "a"}, "repeated: ['a']"),
    ({"default_plan": "gold"}, "default_plan ('gold') is not one of plans"),
    ({"local_tenant": {"plan": "x"}}, "local_tenant.plan ('x')"),
    ({"database_url": "mysql://u:secret@h/db"}, "must be a sqlite: or postgresql URL"),
    ({"plans": [{"name": "a", "requests_per_minute": 0}], "default_plan": "a"}, "requests_per_minute"),
    ({"surprise": 1}, "surprise"),
])
def test_bad_config_names_the_field(raw: dict, needle: str) -> None:
    with pytest.raises(ValidationError) as err:
        TenancyConfig(**raw)
    assert needle in str(err.value)
    assert "secret" not in str(err.value)


def test_plan_helpers() -> None:
    plan = PlanConfig(name="basic", allowed_models=["sdxl", "chat"], max_image_side=1024, max_steps=30)
    ctx = TenantContext(tenant_id=1, tenant="acme", plan=plan, key_prefix="gsk_abcdefgh")
    assert visible_models(ctx, ["sdxl", "wuerstchen", "chat"]) == ["sdxl", "chat"]
    ensure_model_allowed(ctx, "sdxl")
    ensure_model_allowed(ctx, "sdxl-turbo", aliases=["sdxl"])
    with pytest.raises(APIError) as err:
        ensure_model_allowed(ctx, "wuerstchen")
    assert (err.value.status, err.value.code) == (403, "model_not_allowed")
    ensure_within_plan(ctx, width=1024, height=512, steps=30)
    with pytest.raises(APIError) as err:
        ensure_within_plan(ctx, width=1024, height=1536)
    assert (err.value.status, err.value.param) == (400, "height") and "1536" in err.value.message
    with pytest.raises(APIError):
        ensure_within_plan(ctx, steps=31)
