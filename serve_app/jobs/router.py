"""`/v1/jobs`: submit, poll, list, cancel. Thin: auth and quota around `Jobs`."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response

from deployments.diffusion.types import ImageResult
from serve_app.errors import not_found, unavailable
from serve_app.images import qos
from serve_app.images import service as images
from serve_app.images.router import check_plan, render_for
from serve_app.jobs.protocol import Job, JobCreateRequest, JobList
from serve_app.jobs.runner import spec_of
from serve_app.jobs.service import JOBS_KEY, Jobs
from serve_app.state import ServicesDep
from serve_app.tenancy import CurrentTenant, TenancyDep

router = APIRouter(tags=["jobs"])


async def get_jobs(services: ServicesDep) -> Jobs:
    return services.extras[JOBS_KEY]


JobsDep = Annotated[Jobs, Depends(get_jobs)]


@router.post("/v1/jobs", response_model=Job, response_model_exclude_none=True, status_code=202)
async def create_job(body: JobCreateRequest, request: Request, response: Response, services: ServicesDep,
                     jobs: JobsDep, ctx: CurrentTenant, tenancy: TenancyDep) -> Job:
    rendered, template = await render_for(services, ctx, body)
    check_plan(ctx, rendered)
    rendered = qos.stamp(rendered, ctx.plan, body.quality, explicit_steps=body.steps is not None,
                         metadata=body.metadata)
    if body.webhook_url is not None and jobs.webhooks is not None:
        await jobs.webhooks.avalidate(body.webhook_url)
    backlog = await anyio.to_thread.run_sync(jobs.store.backlog)
    if backlog >= jobs.config.max_backlog:
        raise unavailable(f"Service is at capacity ({backlog} jobs waiting); retry later.", retry_after_s=10,
                          code="at_capacity")
    admission = await tenancy.admit(ctx, route="jobs", model=rendered.model.name, images=len(rendered.tasks))

    async def settle(status: str, results: list[ImageResult]) -> None:
        admission.add(images=len(results), gpu_seconds=images.gpu_seconds(results))
        await admission.settle(status)

    try:
        spec = spec_of(rendered, tenant=ctx.tenant,
                       extra={"template_ref": dataclasses.asdict(template) if template else None})
        job = await jobs.runner.submit(tenant_id=ctx.tenant_id, model=rendered.model.name, spec=spec,
                                       webhook_url=body.webhook_url, settle=settle)
    except BaseException:
        await admission.settle("error")
        raise
    response.headers.update(admission.headers())
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    position = await anyio.to_thread.run_sync(jobs.store.queue_position, job)
    return jobs.public(job, queue_position=position)


@router.get("/v1/jobs/{job_id}", response_model=Job, response_model_exclude_none=True)
async def get_job(job_id: str, request: Request, jobs: JobsDep, ctx: CurrentTenant) -> Job:
    job = await anyio.to_thread.run_sync(jobs.store.get, job_id, ctx.tenant_id)
    if job is None:  # another tenant's job is as absent as a missing one
        raise not_found(f"No job {job_id!r}.", param="job_id", code="job_not_found")
    position = None
    if job.status == "queued":
        position = await anyio.to_thread.run_sync(jobs.store.queue_position, job)
    return jobs.public(job, queue_position=position)


@router.get("/v1/jobs", response_model=JobList, response_model_exclude_none=True)
async def list_jobs(request: Request, jobs: JobsDep, ctx: CurrentTenant,
                    limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None,
                    status: str | None = None) -> JobList:
    rows = await anyio.to_thread.run_sync(lambda: jobs.store.list(ctx.tenant_id, limit=limit + 1, after=after,
                                                                    status=status))
    page = rows[:limit]
    return JobList(data=[jobs.public(j) for j in page], has_more=len(rows) > limit,
                   last_id=page[-1].id if page else None)


@router.delete("/v1/jobs/{job_id}", response_model=Job, response_model_exclude_none=True)
async def cancel_job(job_id: str, request: Request, jobs: JobsDep, ctx: CurrentTenant) -> Job:
    """Cancels a queued job at once; a running one stops at its next denoising step."""
    job = await anyio.to_thread.run_sync(jobs.store.request_cancel, job_id, ctx.tenant_id)
    if job is None:
        raise not_found(f"No job {job_id!r}.", param="job_id", code="job_not_found")
    return jobs.public(job)
