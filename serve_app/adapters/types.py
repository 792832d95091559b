"""The registry's vocabulary: an `Adapter` row as the rest of the app sees it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

AdapterKind = Literal["diffusion", "llm"]
ID_PREFIX = "ad_"
ID_HEX = 32  # the id is the first 128 bits of the canonical archive's sha256


def adapter_id_of(sha256: str) -> str:
    return ID_PREFIX + sha256[:ID_HEX]


def storage_key_of(adapter_id: str) -> str:
    """Content-addressed object key: one object per distinct archive, shared by every row of it."""
    return f"adapters/{adapter_id}.zip"


def is_adapter_id(value: str) -> bool:
    hexpart = value[len(ID_PREFIX):]
    return (value.startswith(ID_PREFIX) and len(hexpart) == ID_HEX
            and all(c in "0123456789abcdef" for c in hexpart))


@dataclass(frozen=True)
class Adapter:
    """One registered adapter. `id` is content-addressed (two uploads of the same archive share
    it, whoever owns them); `owner` is the tenant id, None for a global adapter."""

    id: str
    name: str
    kind: AdapterKind
    base_model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    sha256: str
    size_bytes: int
    owner: int | None
    storage_key: str
    created_at: datetime
