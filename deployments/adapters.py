"""What a model replica needs to load LoRA adapters (issue 21), shared by diffusion and LLM.

The application binds an object with this shape into a deployment (serve_app's
`StoreAdapterSource`: downloads from the result store, checks the content hash, caches on the
replica's disk); deployments only know the protocol, never serve_app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class AdapterSource(Protocol):
    def fetch(self, adapter_id: str) -> Path:
        """A local directory with `adapter_config.json` and `adapter_model.safetensors` (PEFT
        format). Blocking (may download): call it from a worker thread."""
        ...


class DirAdapterSource:
    """Adapters already on disk, one directory per id (tests, benchmarks, a pre-synced volume)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def fetch(self, adapter_id: str) -> Path:
        path = self.root / adapter_id
        if not (path / "adapter_model.safetensors").is_file() or path.resolve().parent != self.root.resolve():
            raise FileNotFoundError(f"no adapter {adapter_id!r} under {self.root}")
        return path


def multiplexed_id(adapter_ids: list[str] | tuple[str, ...]) -> str:
    """The Serve multiplexed model id of an adapter set: its sorted ids joined by '+' ('' = none).
    Weights are not part of it: one loaded set serves every weighting."""
    return "+".join(sorted(set(adapter_ids)))


def parse_multiplexed_id(model_id: str) -> tuple[str, ...]:
    return tuple(i for i in model_id.split("+") if i)


class AdapterIncompatible(ValueError):
    """An adapter this replica can't serve as configured (e.g. a compiled engine's slots don't
    cover the layers it targets). A ValueError, so the ingress answers 400, with this `code`."""

    code = "adapter_incompatible"
    param = "loras"
