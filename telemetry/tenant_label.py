"""The `tenant` label of genserve's metrics, bounded however many tenants there are.

Every series with a `tenant` label multiplies by the number of its values, and a histogram by 16
buckets on top, so the label can't be the tenant's name for everyone. It is:
  - the tenant's name for the tenants in `telemetry.tenant_label.named_tenants` (the operator's
    top-N, e.g. from `genserve billing statement`: deterministic on every replica), and for
    tenants on a plan in `named_plans`, first come, until `max_named` names are in use in this
    process (a process that saw more such tenants labels the rest by plan);
  - otherwise `plan:<plan name>`: requests are still counted, per plan;
  - "" for requests without a tenant (no or a bad API key, /health).
So one process exports at most len(named_tenants) + max_named + (number of plans) + 1 values.
Cost per tenant per day for *every* tenant is in the ledger (`genserve usage`, statements), not
in Prometheus.
"""

from __future__ import annotations

import threading

from telemetry.config import TenantLabelConfig


class TenantLabeler:
    def __init__(self, config: TenantLabelConfig | None = None) -> None:
        self.config = config or TenantLabelConfig()
        self._always = frozenset(self.config.named_tenants)
        self._named: set[str] = set()  # named through named_plans, at most max_named
        self._lock = threading.Lock()  # admissions and settles run in worker threads

    def label(self, tenant: str | None, plan: str | None) -> str:
        if not tenant:
            return ""
        if tenant in self._always or tenant in self._named:
            return tenant
        cfg = self.config
        if plan is not None and (plan in cfg.named_plans or "*" in cfg.named_plans):
            with self._lock:
                if tenant in self._named or len(self._named) < cfg.max_named:
                    self._named.add(tenant)
                    return tenant
        return f"plan:{plan}" if plan else "plan:unknown"
