"""The application graph: `serve_app.graph:build_app` is what Serve configs import.

    HTTP ─> Ingress ─┬─> Diffusion-<model> (one deployment per image model, batching)
                     └─> LLM-<model>       (one per chat model)

`args` (the Serve config's `applications[].args`) are validated as `AppConfig` before anything
is deployed, so a bad value fails `serve deploy` with a message naming it.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.diffusion.deployment import Diffusion
from serve_app.config import AppConfig, load_app_config
from serve_app.telemetry import telemetry_of


def _diffusion_app(m, cfg: AppConfig) -> Application:
    # Batching goes through `user_config`: a `serve deploy` that changes it reconfigures the running
    # replicas in place (Diffusion.reconfigure, which also proves a larger memory budget fits).
    batching = {"max_batch_size": m.batching.max_batch_size, "batch_wait_timeout_s": m.batching.batch_wait_timeout_s,
                "max_batch_megapixels": m.batch_megapixels}
    probe = ({"native_side": m.native_resolution, "max_side": m.max_side, "size_multiple": m.size_multiple}
             if m.probe_memory else None)
    return Diffusion.options(name=m.deployment_name, user_config=batching).bind(
        name=m.name, family=m.family, model=m.model, dtype=m.dtype, device=m.device, variant=m.variant,
        batch_invariant=m.batch_invariant, decoder_steps=m.decoder_steps, optimize=m.optimize.model_dump(),
        telemetry=telemetry_of(cfg).model_dump(), adaptive_quality=m.adaptive_quality.model_dump(),
        priority_aging_s=m.batching.priority_aging_s, vae_slicing=m.vae_slicing, probe=probe)


def _llm_apps(cfg: AppConfig) -> dict[str, Application]:
    if not cfg.llm_models:
        return {}
    from deployments.llm.deployment import LLMDeployment

    return {m.name: LLMDeployment.options(name=m.deployment_name).bind(m.model_dump(mode="json"),
                                                                      work_dir=str(cfg.work_dir),
                                                                      stream_batch_ms=m.stream_interval_ms,
                                                                      telemetry=telemetry_of(cfg).model_dump())
            for m in cfg.llm_models}


def build_app(args: dict[str, Any]) -> Application:
    from serve_app.ingress import Ingress

    cfg = load_app_config(args)
    diffusion = {m.name: _diffusion_app(m, cfg) for m in cfg.diffusion_models}
    # The typed config itself (picklable) goes to the ingress: a JSON dump would mask its secrets.
    return Ingress.bind(cfg, diffusion, _llm_apps(cfg))
