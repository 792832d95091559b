"""`/v1/jobs`: submit, poll, list, cancel. Thin: auth and quota around `Jobs`."""

from __future__ import annotations

import logging
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response

from serve_app.errors import not_found
from serve_app.jobs.protocol import Job, JobCreateRequest, JobList
from serve_app.jobs.service import Jobs
from serve_app.jobs.store import JobRecord
from serve_app.paging import limit_only
from serve_app.state import ServicesDep
from serve_app.tenancy import CurrentTenant

router = APIRouter(tags=["jobs"])
logger = logging.getLogger("genserve.jobs")
_unlisted: set[str] = set()  # ids of stored jobs that could not be shown (logged once each)


async def get_jobs(services: ServicesDep) -> Jobs:
    if services.jobs is None:
        raise RuntimeError("services.jobs is not set: the ingress must build Jobs")
    return services.jobs


JobsDep = Annotated[Jobs, Depends(get_jobs)]


@router.post("/v1/jobs", response_model=Job, response_model_exclude_none=True, status_code=202)
async def create_job(body: JobCreateRequest, response: Response, jobs: JobsDep, ctx: CurrentTenant) -> Job:
    job, admission = await jobs.create(body, ctx)
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


@router.get("/v1/jobs/{job_id}/preview", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "The latest partial image (PNG)."}})
async def get_job_preview(job_id: str, jobs: JobsDep, ctx: CurrentTenant,
                          image: Annotated[int | None, Query(ge=0, le=1000)] = None) -> Response:
    """The latest partial image of a running job that asked for `partial_images` (of image `image`,
    else of whichever image sent one last); 404 before the first one and after the job ended."""
    job = await anyio.to_thread.run_sync(jobs.store.get, job_id, ctx.tenant_id)
    if job is None:  # another tenant's job is as absent as a missing one
        raise not_found(f"No job {job_id!r}.", param="job_id", code="job_not_found")
    preview = await anyio.to_thread.run_sync(jobs.previews.latest, job_id, image)
    if preview is None:
        why = "it has ended (see its results)" if job.status not in ("queued", "running") else (
            "none yet" if job.spec.get("partial_images") else "it asked for no partial_images")
        raise not_found(f"No preview of job {job_id!r}: {why}.", param="job_id", code="preview_not_available")
    return Response(preview.png, media_type="image/png", headers={
        "Cache-Control": "no-store", "X-Genserve-Preview-Image": str(preview.image_index),
        "X-Genserve-Preview-Step": str(preview.step), "X-Genserve-Preview-Total": str(preview.total)})


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
