"""`/v1/jobs`: submit, poll, list, cancel. Thin: auth and quota around `Jobs`."""

from __future__ import annotations

import dataclasses
import logging
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Request, Response

from deployments.diffusion.types import ImageResult
from serve_app.errors import not_found, unavailable
from serve_app.images import qos
from serve_app.images import service as images
from serve_app.images.enhance import enhance_admitted, enhance_target
from serve_app.images.router import check_plan, render_for
from serve_app.jobs.protocol import Job, JobCreateRequest, JobList
from serve_app.jobs.runner import spec_of
from serve_app.jobs.service import JOBS_KEY, Jobs
from serve_app.jobs.store import JobRecord
from serve_app.paging import limit_only
from serve_app.state import ServicesDep
from serve_app.tenancy import CurrentTenant, TenancyDep
from serve_app.tenancy.service import status_of

router = APIRouter(tags=["jobs"])
logger = logging.getLogger("genserve.jobs")
_unlisted: set[str] = set()  # ids of stored jobs that could not be shown (logged once each)


async def get_jobs(services: ServicesDep) -> Jobs:
    return services.extras[JOBS_KEY]


JobsDep = Annotated[Jobs, Depends(get_jobs)]


@router.post("/v1/jobs", response_model=Job, response_model_exclude_none=True, status_code=202)
async def create_job(body: JobCreateRequest, request: Request, response: Response, services: ServicesDep,
                     jobs: JobsDep, ctx: CurrentTenant, tenancy: TenancyDep) -> Job:
    rendered, template = await render_for(services, ctx, body)
    check_plan(ctx, rendered)
    llm = enhance_target(services, ctx, rendered)
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
        extra: dict = {"template_ref": dataclasses.asdict(template) if template else None}
        if llm is not None:
            # Expanded once, here: every attempt (a retry after a replica died) draws the same prompt.
            extra["asked_prompt"] = rendered.prompt
            rendered = await enhance_admitted(services, tenancy, ctx, llm, rendered)
        spec = spec_of(rendered, tenant=ctx.tenant, extra=extra)
        job = await jobs.runner.submit(tenant_id=ctx.tenant_id, model=rendered.model.name, spec=spec,
                                       webhook_url=body.webhook_url, settle=settle)
    except BaseException as e:
        await admission.settle(status_of(e))
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
                    limit: Annotated[int, Depends(limit_only(default_limit=20, max_limit=100))],
                    after: str | None = None, status: str | None = None) -> JobList:
    rows = await anyio.to_thread.run_sync(lambda: jobs.store.list(ctx.tenant_id, limit=limit + 1, after=after,
                                                                    status=status))
    page = rows[:limit]
    return JobList(data=[j for j in (_listable(jobs, r) for r in page) if j is not None],
                   has_more=len(rows) > limit, last_id=page[-1].id if page else None)


def _listable(jobs: Jobs, record: JobRecord) -> Job | None:
    """The job's public shape, or None for a stored row that can't become one (a spec written by
    an older version, edited by hand...): one bad row must not hide the tenant's other jobs. (Text
    that can't be encoded is already repaired where stored JSON is read: tenancy/db.py.)"""
    try:
        return jobs.public(record)
    except Exception:
        if record.id not in _unlisted:
            _unlisted.add(record.id)
            logger.exception("job %s can't be shown; left out of the list", record.id)
        return None


@router.delete("/v1/jobs/{job_id}", response_model=Job, response_model_exclude_none=True)
async def cancel_job(job_id: str, request: Request, jobs: JobsDep, ctx: CurrentTenant) -> Job:
    """Cancels a job. A queued job ends `cancelled` at once and never runs. A running job's image
    calls are cancelled and each image stops at its next denoising step (on whichever ingress
    replica runs it, within `jobs.cancel_poll_s`); it ends `cancelled`, with no results and no
    charge. A job whose images were all done when the cancel arrived is delivered (`succeeded`,
    billed). Answers the job as it is then (a running job elsewhere may still say `running`)."""
    job = await jobs.cancel(job_id, ctx.tenant_id)
    if job is None:
        raise not_found(f"No job {job_id!r}.", param="job_id", code="job_not_found")
    return jobs.public(job)
