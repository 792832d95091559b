"""HTTP shapes of `/v1/adapters` (OpenAI-style objects and lists)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from serve_app.adapters.types import Adapter


class AdapterOut(BaseModel):
    object: Literal["adapter"] = "adapter"
    id: str
    name: str
    kind: Literal["diffusion", "llm"]
    base_model: str
    rank: int
    alpha: float
    target_modules: list[str]
    sha256: str
    bytes: int
    owned_by: Literal["tenant", "global"]
    created_at: int

    @classmethod
    def of(cls, a: Adapter) -> AdapterOut:
        return cls(id=a.id, name=a.name, kind=a.kind, base_model=a.base_model, rank=a.rank, alpha=a.alpha,
                   target_modules=list(a.target_modules), sha256=a.sha256, bytes=a.size_bytes,
                   owned_by="global" if a.owner is None else "tenant", created_at=int(a.created_at.timestamp()))


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterOut]


class AdapterDeleted(BaseModel):
    object: Literal["adapter.deleted"] = "adapter.deleted"
    id: str
    name: str
    deleted: bool = True
