"""Jobs as a feature: `create` admits and submits a job (its images prepared by `ImagesService`),
the runner runs it through `ImagesService.run` and `deliver`, and records become the public `Job`."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio

from deployments.diffusion.types import ImageResult, PartialImage
from serve_app.errors import bad_request, unavailable
from serve_app.images.service import ImagesService, degradation, gpu_seconds
from serve_app.images.spec import SPEC_VERSION, ImageSpec
from serve_app.jobs.config import JobsConfig
from serve_app.jobs.previews import PreviewStore
from serve_app.jobs.protocol import Job, JobCreateRequest, JobResult, JobUsed
from serve_app.jobs.runner import JobRunner
from serve_app.jobs.store import JobRecord, JobStore
from serve_app.storage import ResultStore
from serve_app.tenancy import Admission, Tenancy, TenantContext
from serve_app.tenancy.service import status_of

logger = logging.getLogger("genserve.jobs")


def used_of(results: list[ImageResult]) -> dict[str, Any] | None:
    """What the images were actually generated with, for the job record (`Job.used`): adaptive
    quality may have run fewer steps than the spec asked for."""
    if not results:
        return None
    degraded, reason = degradation(results)
    first = results[0]
    return {"model": first.model, "width": first.width, "height": first.height,
            "steps_used": [r.steps for r in results],
            "requested_steps": [r.requested_steps or r.steps for r in results],
            "degraded": degraded, "reason": reason}


class Jobs:
    def __init__(self, *, config: JobsConfig, tenancy: Tenancy, storage: ResultStore, images: ImagesService,
                 webhooks: Any = None) -> None:
        self.config = config
        self.tenancy = tenancy
        self.storage = storage
        self.images = images
        self.webhooks = webhooks
        self.store = JobStore(tenancy.engine)
        self.previews = PreviewStore(tenancy.engine, max_bytes=config.preview_max_bytes)
        self.runner = JobRunner(self.store, execute=self._execute, config=config, finish_hook=self._deliver,
                                terminal_hook=self._on_terminal, orphan_usage=self._orphan_usage)

    async def create(self, body: JobCreateRequest, ctx: TenantContext) -> tuple[JobRecord, Admission]:
        """`POST /v1/jobs`: the checks of an image request, then the job's admission (settled when the
        job ends), then the job, durable once this returns."""
        if body.stream:
            raise bad_request("A job is not streamed: poll GET /v1/jobs/{id}, and GET /v1/jobs/{id}/preview for its "
                              "partial images (`partial_images`).", param="stream", code="unsupported_for_jobs")
        prepared = await self.images.prepare(body, ctx)
        if body.webhook_url is not None and self.webhooks is not None:
            await self.webhooks.avalidate(body.webhook_url)
        backlog = await anyio.to_thread.run_sync(self.store.backlog)
        if backlog >= self.config.max_backlog:
            raise unavailable(f"Service is at capacity ({backlog} jobs waiting); retry later.", retry_after_s=10,
                              code="at_capacity")
        admission = await self.tenancy.admit(ctx, route="jobs", model=prepared.spec.model, images=prepared.spec.n)

        async def settle(status: str, results: list[ImageResult]) -> None:
            admission.add(images=len(results), gpu_seconds=gpu_seconds(results))
            await admission.settle(status)

        try:
            # Expanded once, here: every attempt (a retry after a replica died) draws the same prompt.
            prepared = await self.images.enhance(prepared)
            spec = prepared.spec
            job = await self.runner.submit(tenant_id=ctx.tenant_id, model=spec.model, spec=spec.model_dump(mode="json"),
                                           webhook_url=body.webhook_url, settle=settle)
        except BaseException as e:
            await admission.settle(status_of(e))
            raise
        return job, admission

    async def cancel(self, job_id: str, tenant_id: int, *, wait_s: float = 2.0) -> JobRecord | None:
        """`DELETE /v1/jobs/{id}`: a queued job ends `cancelled` at once (its webhook fires); a
        running one is flagged, and stopped now when it runs on this replica (waiting up to
        `wait_s` for it to end, so the answer usually says `cancelled`), else by its own replica
        within `cancel_poll_s`. A job already ended is returned as it is."""
        job, ended = await anyio.to_thread.run_sync(self.store.request_cancel, job_id, tenant_id)
        if job is None:
            return None
        if ended:
            self.runner.cancel(job_id)  # a local run waiting to claim it releases its usage now
            await self.runner.announce(job_id)
        elif job.status == "running" and self.runner.cancel(job_id):
            await self.runner.wait_ended(job_id, wait_s)
            job = await anyio.to_thread.run_sync(self.store.get, job_id, tenant_id)
        return job

    async def _execute(self, job: JobRecord, progress: Any) -> list[ImageResult]:
        spec = ImageSpec.from_stored(job.spec)
        # A fresh task id per attempt: a cancel mark of a dead attempt must not stop this one.
        ids = [f"{job.id}:{job.attempts}:{i}" for i in range(spec.n)]
        # Input images are stored as references: loaded again (and checked) for every attempt.
        images = await self.images.load_images(spec, job.tenant_id)

        async def preview(i: int, partial: PartialImage) -> None:  # the latest one, beside the progress
            await anyio.to_thread.run_sync(lambda: self.previews.put(
                job.id, self.runner.owner, i, partial.png, step=partial.step, total=partial.total))

        return await self.images.run(spec, task_ids=ids, on_progress=progress, images=images,
                                     on_preview=preview if spec.partial_images else None)

    async def _deliver(self, job: JobRecord, results: list[ImageResult]) -> dict[str, Any]:
        """Upload every image (retried inside the store; a failure fails the attempt, so the job is
        retried or fails with the reason — an image is never silently lost), then log it."""
        latency = (time.time() - job.created_at.timestamp()) if job.created_at else None
        keys, generation_id = await self.images.deliver(ImageSpec.from_stored(job.spec), results,
                                                        tenant_id=job.tenant_id, latency_s=latency, job_id=job.id)
        return {"result_keys": keys, "generation_id": generation_id, "used": used_of(results)}

    async def _orphan_usage(self, job: JobRecord, results: list[ImageResult]) -> None:
        info = await anyio.to_thread.run_sync(self.tenancy.get_tenant, ImageSpec.from_stored(job.spec).tenant)
        plan = self.tenancy.config.plan(info.plan) or self.tenancy.config.plans[0]
        ctx = TenantContext(job.tenant_id, info.name, plan, key_prefix="job")
        await anyio.to_thread.run_sync(lambda: self.tenancy.record_usage(
            ctx, route="jobs", model=job.model, images=len(results), gpu_seconds=gpu_seconds(results)))

    async def _on_terminal(self, job: JobRecord) -> None:
        if job.spec.get("partial_images"):  # the results replace the previews
            await anyio.to_thread.run_sync(self.previews.clear, job.id)
        if job.webhook_url and self.webhooks is not None:
            # URLs from config: a job's spec may still carry a `base_url` taken from an old request's Host.
            payload = self.public(job).model_dump(mode="json")
            await self.webhooks.send(job.webhook_url, payload, job_id=job.id)

    def public(self, job: JobRecord, *, queue_position: int | None = None) -> Job:
        prompt, asked, seeds, params = _shown(job.spec)
        results = [JobResult(url=self.storage.url(k), seed=seed, revised_prompt=prompt)
                   for k, seed in zip(job.result_keys or [], seeds, strict=False)]
        eta = None
        if queue_position is not None:
            eta = self.runner.estimated_seconds(queue_position, len(seeds))
        return Job(id=job.id, status=job.status, model=job.model, progress=round(job.progress, 4),
                   queue_position=queue_position, estimated_seconds=eta, attempts=job.attempts,
                   created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
                   error=job.error, results=results, generation_id=job.generation_id,
                   prompt=asked or prompt, params=params, used=JobUsed(**job.used) if job.used else None)


def _shown(stored: dict[str, Any]) -> tuple[str, str | None, list[int | None], dict[str, Any]]:
    """(drawn prompt, prompt before `enhance`, seeds, public params) of a stored job. A row stored
    before `ImageSpec` is shown as it was stored then (its `params` is that public view already)."""
    if stored.get("spec_version") == SPEC_VERSION:
        spec = ImageSpec.model_validate(stored)
        return spec.prompt, spec.asked_prompt, list(spec.seeds), spec.describe()
    return (stored["prompt"], stored.get("asked_prompt"), [t.get("seed") for t in stored["tasks"]],
            stored.get("params", {}))
