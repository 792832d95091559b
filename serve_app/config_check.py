"""Whole-file checks of a Serve config: Ray's schema, our typed `args`, and cross-checks.

The graph builder only sees `args`; the `deployments:` overrides (GPU fractions, replicas) are
checked here, by `genserve config check` and by `genserve run` before anything starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from serve_app.config import AppConfig, load_app_config

GRAPH_IMPORT_PATH = "serve_app.graph:build_app"
GPU_FRACTION_RANGE = (0.25, 1.0)


def check_document(doc: dict[str, Any]) -> list[AppConfig]:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(doc)
    configs = []
    for i, app in enumerate(doc.get("applications") or []):
        if app.get("import_path") != GRAPH_IMPORT_PATH:
            continue
        cfg = load_app_config(app.get("args") or {})
        names = {"Ingress"} | {m.deployment_name for m in cfg.diffusion_models} | {
            m.deployment_name for m in cfg.llm_models}
        for d in app.get("deployments") or []:
            where = f"applications[{i}].deployments[name={d.get('name')!r}]"
            if d.get("name") not in names:
                raise ValueError(f"{where}: not a deployment of this application (known: {sorted(names)})")
            gpus = (d.get("ray_actor_options") or {}).get("num_gpus", 0) or 0
            lo, hi = GPU_FRACTION_RANGE
            if d["name"].startswith("Diffusion-") and gpus and not lo <= gpus <= hi:
                raise ValueError(f"{where}: ray_actor_options.num_gpus must be 0 (CPU) or between {lo} and "
                                 f"{hi}, got {gpus}")
            if d["name"].startswith("LLM-") and gpus and gpus != int(gpus):
                raise ValueError(f"{where}: ray_actor_options.num_gpus of an LLM must be whole GPUs (its engine "
                                 f"sizes its KV cache from the card's memory), got {gpus}")
            if "autoscaling_config" not in d and "num_replicas" not in d:
                raise ValueError(f"{where}: give autoscaling_config (or num_replicas)")
        configs.append(cfg)
    return configs


def check_file(path: str | Path) -> list[AppConfig]:
    return check_document(yaml.safe_load(Path(path).read_text()))
