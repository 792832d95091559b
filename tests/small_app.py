"""A small genserve app beside the session app, on the same cluster: one tiny SDXL model with ONE
diffusion replica, its own plans and tenants.

For tests whose outcome depends on a single replica's queue (plan priority order, adaptive
quality's load): the session app autoscales its diffusion deployment to two replicas, and which
replica a request lands on would then decide the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ray import serve

# A plan without limits (the tests measure order and quality, not quotas).
UNLIMITED = {"requests_per_minute": None, "tokens_per_minute": None, "images_per_minute": None,
             "max_concurrent_requests": None, "max_image_side": None, "max_steps": None,
             "monthly_budget_usd": None}


@dataclass
class SmallApp:
    name: str
    url: str
    model: str
    keys: dict[str, str]  # tenant -> API key

    def auth(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def stats(self) -> dict:
        """The one diffusion replica's view: queued, running, load, degraded."""
        handle = serve.get_deployment_handle(f"Diffusion-{self.model}", app_name=self.name)
        return handle.stats.remote().result()

    def delete(self) -> None:
        serve.delete(self.name)


def deploy(name: str, *, base_url: str, work_dir: Path, models_dir: Path, plans: list[dict],
           tenants: dict[str, str], model: dict | None = None, max_ongoing_requests: int = 32,
           replica: dict | None = None, adapters: bool = False) -> SmallApp:
    """Deploys app `name` at `{base_url}/{name}`; `tenants` maps tenant name -> plan name; `model`
    overrides fields of the diffusion model entry (steps, batching, adaptive_quality, lora); `replica`
    overrides fields of the replica's copy only (an ingress and a replica that disagree); `adapters`:
    the replica fetches LoRA adapters from the app's registry, as the full graph wires it."""
    from deployments.diffusion.deployment import DiffusionDeployment
    from serve_app.adapters.registry import adapter_source
    from serve_app.config import load_app_config
    from serve_app.ingress import Ingress
    from serve_app.tenancy import Tenancy

    model_name = f"{name}-tiny"
    entry = {"name": model_name, "family": "sdxl", "model": str(models_dir / "sdxl-tiny"), "native_resolution": 64,
             "size_multiple": 8, "min_side": 32, "max_side": 64, "default_steps": 4, "max_steps": 50,
             **(model or {})}
    cfg = load_app_config({
        "work_dir": str(work_dir), "diffusion_models": [entry], "public_base_url": f"{base_url}/{name}",
        "tenancy": {"plans": plans, "default_plan": plans[0]["name"], "local_tenant": {"enabled": False}},
    })
    tenancy = Tenancy(cfg.tenancy, work_dir=cfg.work_dir)
    keys = {}
    for tenant, plan in tenants.items():
        tenancy.create_tenant(tenant, plan)
        keys[tenant] = tenancy.create_key(tenant).key
    tenancy.close()
    m = cfg.diffusion_models[0]
    diffusion = DiffusionDeployment.options(name=m.deployment_name, num_replicas=1, ray_actor_options={"num_cpus": 0.1},
                                  max_ongoing_requests=max_ongoing_requests).bind(
        m.model_validate({**m.model_dump(), "device": "cpu", **(replica or {})}), None,
        adapter_source(cfg) if adapters else None)
    app = Ingress.options(num_replicas=1, ray_actor_options={"num_cpus": 0.1}).bind(cfg, {m.name: diffusion}, {})
    serve._run(app, name=name, route_prefix=f"/{name}", _blocking=True)
    return SmallApp(name=name, url=f"{base_url}/{name}", model=m.name, keys=keys)
