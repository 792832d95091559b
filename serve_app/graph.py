"""The application graph: `serve_app.graph:build_app` is what Serve configs import.

    HTTP ─> Ingress ─┬─> Diffusion-<model> (one deployment per image model, batching)
                     └─> LLM-<model>       (one per chat model)

`args` (the Serve config's `applications[].args`) are validated as `AppConfig` before anything
is deployed, so a bad value fails `serve deploy` with a message naming it. Each model deployment is
bound with its typed config object (its own contract, deployments/*/config.py), as validated here.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.diffusion.config import DiffusionModelConfig
from deployments.diffusion.deployment import DiffusionDeployment
from serve_app.config import AppConfig, load_app_config
from telemetry import TelemetryConfig


def _diffusion_app(m: DiffusionModelConfig, telemetry: TelemetryConfig, adapters: Any = None) -> Application:
    # Batching also goes through `user_config`: a `serve deploy` that changes it reconfigures the
    # running replicas in place (DiffusionServer.reconfigure, which also proves a larger memory budget fits).
    # `adapters`: where replicas fetch LoRA adapters (the registry's store; serve_app/adapters/source.py).
    return DiffusionDeployment.options(name=m.deployment_name, user_config=m.batching_user_config()).bind(
        m, telemetry, adapters if m.serves_loras else None)


def _llm_apps(cfg: AppConfig, telemetry: TelemetryConfig) -> dict[str, Application]:
    if not cfg.llm_models:
        return {}
    from deployments.llm.deployment import LLMDeployment
    from serve_app.adapters.registry import adapter_source

    # A model over several GPUs (tensor/pipeline parallel) gets a placement group of one GPU bundle per
    # engine worker (`LLMModelConfig.deployment_options`); one GPU or none: the Serve config places it.
    # A model serving LoRA adapters fetches them by id from the registry's store (issue 21).
    source = adapter_source(cfg) if any(m.lora.enabled for m in cfg.llm_models) else None
    return {m.name: LLMDeployment.options(name=m.deployment_name, **m.deployment_options())
            .bind(m, work_dir=cfg.work_dir, telemetry=telemetry, adapter_source=source if m.lora.enabled else None)
            for m in cfg.llm_models}


def build_app(args: dict[str, Any]) -> Application:
    from serve_app.ingress import Ingress

    cfg = load_app_config(args)
    telemetry = cfg.telemetry
    from serve_app.adapters.registry import adapter_source

    source = adapter_source(cfg)
    diffusion = {m.name: _diffusion_app(m, telemetry, source) for m in cfg.diffusion_models}
    # The typed config itself (picklable) goes to the ingress: a JSON dump would mask its secrets.
    return Ingress.bind(cfg, diffusion, _llm_apps(cfg, telemetry))
