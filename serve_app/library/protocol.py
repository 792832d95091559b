"""Request and response bodies of /v1/templates and /v1/generations."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class TemplateCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=128)
    template: str = Field(max_length=4000, description="Text with {placeholders}.")
    category: str = Field("general", max_length=64)
    defaults: str = Field("", max_length=1024, description="Default parameters, e.g. `--ar 16:9 --s 250`.")
    tags: list[str] = Field(default_factory=list, max_length=32)


class TemplateOut(BaseModel):
    object: Literal["template"] = "template"
    name: str
    version: int
    category: str
    template: str
    defaults: str
    tags: list[str]
    variables: list[str] = Field(description="Placeholders, in order of first appearance.")
    shared: bool = Field(description="True for templates every tenant sees (managed by the operator).")
    created_at: datetime
    deleted_at: datetime | None = None
    avg_rating: float | None = Field(None, description="Mean of your ratings of generations from it.")
    rating_count: int = 0


class TemplateList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TemplateOut]
    total: int
    limit: int
    offset: int


class RatingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rating: int = Field(ge=1, le=5)


class GenerationOut(BaseModel):
    object: Literal["generation"] = "generation"
    id: str
    job_id: str | None
    template: str | None
    template_version: int | None
    prompt: str
    negative_prompt: str
    model: str
    seeds: list[int]
    params: dict[str, Any]
    result_keys: list[str]
    result_urls: list[str]
    latency_s: float | None
    created_at: datetime
    rating: int | None
    rated_at: datetime | None


class GenerationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[GenerationOut]
    total: int
    limit: int
    offset: int
