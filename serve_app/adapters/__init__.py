"""LoRA adapters (issue 21): a registry of PEFT LoRA adapters per tenant (private) or global,
stored in the result store under their content hash, and the replica-side fetch.

    registry = AdapterRegistry(engine, store, models=..., config=cfg.adapters)   # the ingress
    adapter = registry.resolve(tenant_id, "diffusion", "ink-style")             # 404 if not visible
    path = registry.materialize(adapter)        # local dir: adapter_config.json + adapter_model.safetensors
    source = StoreAdapterSource(...)            # picklable; a replica's `fetch(adapter_id) -> dir`

Only the light types are exported here: a replica unpickles `source.StoreAdapterSource` and must
not import SQLAlchemy or FastAPI for it.
"""

from __future__ import annotations

from serve_app.adapters.types import Adapter, AdapterKind

__all__ = ["Adapter", "AdapterKind"]
