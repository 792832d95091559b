"""The metrics' `tenant` label stays bounded with many tenants (telemetry/tenant_label.py): named
tenants, first-come names on the named plans up to max_named, everyone else by plan; and the
requests-in-flight gauge (queue by model and tenant) goes up at admission and back at settle."""

from __future__ import annotations

from pathlib import Path

import pytest
from servers import make_tenancy

from telemetry import metrics
from telemetry.config import TelemetryConfig, TenantLabelConfig
from telemetry.tenant_label import TenantLabeler


def test_label_set_is_bounded_with_many_tenants() -> None:
    cfg = TenantLabelConfig(named_tenants=["big-free"], named_plans=["enterprise"], max_named=5)
    labeler = TenantLabeler(cfg)
    plans = ["free", "pro", "enterprise"]
    labels = {labeler.label(f"t{i}", plans[i % 3]) for i in range(10_000)}
    labels |= {labeler.label("big-free", "free"), labeler.label(None, None), labeler.label("", "free")}
    bound = len(cfg.named_tenants) + cfg.max_named + len(plans) + 1
    assert len(labels) == bound
    assert labels == {"big-free", "", "plan:free", "plan:pro", "plan:enterprise", "t2", "t5", "t8", "t11", "t14"}
    # A tenant keeps its label; the sixth enterprise tenant and later ones count under their plan.
    assert labeler.label("t5", "enterprise") == "t5" and labeler.label("t17", "enterprise") == "plan:enterprise"
    assert TenantLabeler(TenantLabelConfig(named_plans=["*"], max_named=2)).label("x", "free") == "x"
    assert TenantLabeler(TenantLabelConfig(named_plans=[])).label("x", "enterprise") == "plan:enterprise"
    assert TelemetryConfig().tenant_label.named_plans == ["enterprise"]


def test_admissions_label_bounded_and_in_flight_returns_to_zero(tmp_path: Path) -> None:
    unlimited = {"requests_per_minute": None, "tokens_per_minute": None, "images_per_minute": None,
                 "max_concurrent_requests": None, "monthly_budget_usd": None}
    tenancy = make_tenancy(f"sqlite:///{tmp_path / 'l.db'}", tmp_path,
                           plans=[{"name": "basic", **unlimited}, {"name": "gold", **unlimited}])
    metrics.configure_tenant_labels(TenantLabelConfig(named_plans=["gold"], max_named=3))
    try:
        from serve_app.tenancy.service import TenantContext

        contexts = []
        for i in range(40):
            plan = "gold" if i % 2 else "basic"
            tenancy.create_tenant(f"t{i}", plan)
            contexts.append(TenantContext(tenant_id=i + 1, tenant=f"t{i}", plan=tenancy.config.plan(plan),
                                          key_prefix="gsk_test"))
        before = metrics.in_flight()
        admissions = [tenancy.admit_sync(c, route="chat", model="m-label-test") for c in contexts]
        ours = {k: v - before.get(k, 0) for k, v in metrics.in_flight().items() if k[1] == "m-label-test"}
        assert sum(ours.values()) == 40
        assert {k[2] for k in ours} == {"t1", "t3", "t5", "plan:gold", "plan:basic"}  # 3 names + 2 plans
        assert ours[("chat", "m-label-test", "plan:gold")] == 17
        for a in admissions:
            a.settle_sync()
        assert all(v == 0 for k, v in metrics.in_flight().items() if k[1] == "m-label-test")
        # A step within an admitted request (prompt expansion) is not a request in flight of its own.
        step = tenancy.admit_sync(contexts[0], route="images.enhance", model="m-label-test", within_request=True)
        assert ("images.enhance", "m-label-test", "plan:basic") not in metrics.in_flight()
        step.settle_sync()
    finally:
        metrics.configure_tenant_labels(TenantLabelConfig())
        tenancy.close()


@pytest.mark.parametrize("name", ["genserve_request_latency_seconds", "genserve_requests_in_flight",
                                  "genserve_gpu_cost_usd_total"])
def test_by_model_and_tenant(name: str) -> None:
    from telemetry.catalog import GENSERVE_METRICS

    assert {"model", "tenant"} <= set(GENSERVE_METRICS[name].tag_keys)


def test_descriptions_are_ascii() -> None:
    """Ray's Cython metric constructor encodes descriptions as ASCII (a '×' raised at registration)."""
    from telemetry.catalog import GENSERVE_METRICS

    for name, spec in GENSERVE_METRICS.items():
        assert spec.description.isascii(), name
