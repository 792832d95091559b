from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from serve_app.images.protocol import ImageGenerationRequest

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobCreateRequest(ImageGenerationRequest):
    """`POST /v1/jobs`: the body of `/v1/images/generations`, plus where to report the outcome."""

    webhook_url: str | None = Field(None, max_length=2048)


class JobResult(BaseModel):
    url: str
    seed: int | None = None
    revised_prompt: str | None = Field(None, description="What was drawn: the LLM's expansion with `enhance`, "
                                       "else the rendered prompt (as `data[].revised_prompt` of the sync route).")


class JobUsed(BaseModel):
    """What the images were actually generated with (the same facts as `genserve` in a
    synchronous response): adaptive quality may run fewer steps than `params.steps` under load."""

    model: str
    width: int
    height: int
    steps_used: list[int] = Field(description="Per image: denoising steps actually run.")
    requested_steps: list[int] = Field(description="Per image: steps the request asked for.")
    degraded: bool = Field(description="Some image ran with fewer steps than asked (adaptive quality).")
    reason: str | None = Field(None, description="Why it was degraded, e.g. `load`.")


class Job(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    model: str
    progress: float
    queue_position: int | None = None
    estimated_seconds: float | None = None
    attempts: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    results: list[JobResult] = Field(default_factory=list)
    generation_id: str | None = None
    prompt: str = Field(description="The rendered prompt as asked (before `enhance`; results carry what was drawn).")
    params: dict = Field(description="What was asked for (the rendered request).")
    used: JobUsed | None = Field(None, description="What was actually used; set once the job succeeded.")


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool
    last_id: str | None = None
