"""Jobs as a feature: builds the runner with its hooks (storage, generation log, usage, webhooks)
and turns records into the public `Job` shape."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio

from deployments.diffusion.types import ImageResult
from serve_app.jobs.config import JobsConfig
from serve_app.jobs.protocol import Job, JobResult, JobUsed
from serve_app.jobs.runner import JobRunner
from serve_app.jobs.store import JobRecord, JobStore
from serve_app.library import ResolvedTemplate
from serve_app.storage import ResultStore, result_key
from serve_app.tenancy import Tenancy, TenantContext

logger = logging.getLogger("genserve.jobs")

JOBS_KEY = "jobs"


def template_of(spec: dict) -> ResolvedTemplate | None:
    ref = spec.get("template_ref")
    return ResolvedTemplate(**ref) if ref else None


class Jobs:
    def __init__(self, *, config: JobsConfig, tenancy: Tenancy, storage: ResultStore, diffusion: dict[str, Any],
                 library: Any = None, webhooks: Any = None) -> None:
        self.config = config
        self.tenancy = tenancy
        self.storage = storage
        self.library = library
        self.webhooks = webhooks
        self.store = JobStore(tenancy.engine)
        self.runner = JobRunner(self.store, diffusion=diffusion, config=config, finish_hook=self._store_results,
                                terminal_hook=self._on_terminal, orphan_usage=self._orphan_usage)

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

    async def _store_results(self, job: JobRecord, results: list[ImageResult]) -> dict:
        """Upload every image (retried inside the store; a failure fails the attempt, so the job is
        retried or fails with the reason — an image is never silently lost), then log it."""
        keys = []
        for r in results:
            key = result_key(job.tenant_id)
            keys.append(await self.storage.aput(key, r.png, "image/png"))
        generation_id = None
        if self.library is not None:
            spec = job.spec
            latency = (time.time() - job.created_at.timestamp()) if job.created_at else None
            generation_id = await anyio.to_thread.run_sync(lambda: self.library.log_generation(
                job.tenant_id, prompt=spec["prompt"], negative_prompt=spec["negative_prompt"], model=job.model,
                seeds=[r.seed for r in results], params=spec.get("params", {}), result_keys=keys,
                latency_s=latency, job_id=job.id, template=template_of(spec)))
        return {"result_keys": keys, "generation_id": generation_id}

    async def _orphan_usage(self, job: JobRecord, results: list[ImageResult]) -> None:
        info = await anyio.to_thread.run_sync(self.tenancy.get_tenant, job.spec["tenant"])
        plan = self.tenancy.config.plan(info.plan) or self.tenancy.config.plans[0]
        ctx = TenantContext(job.tenant_id, info.name, plan, key_prefix="job")
        gpu = sum(r.compute_s / max(1, r.batch_size) for r in results)
        await anyio.to_thread.run_sync(lambda: self.tenancy.record_usage(
            ctx, route="jobs", model=job.model, images=len(results), gpu_seconds=gpu))

    async def _on_terminal(self, job: JobRecord) -> None:
        if job.webhook_url and self.webhooks is not None:
            # URLs from config: a job's spec may still carry a `base_url` taken from an old request's Host.
            payload = self.public(job).model_dump(mode="json")
            await self.webhooks.send(job.webhook_url, payload, job_id=job.id)

    def public(self, job: JobRecord, *, queue_position: int | None = None) -> Job:
        results = [JobResult(url=self.storage.url(k), seed=t.get("seed"), revised_prompt=job.spec["prompt"])
                   for k, t in zip(job.result_keys or [], job.spec["tasks"], strict=False)]
        eta = None
        if queue_position is not None:
            eta = self.runner.estimated_seconds(queue_position, len(job.spec["tasks"]))
        return Job(id=job.id, status=job.status, model=job.model, progress=round(job.progress, 4),
                   queue_position=queue_position, estimated_seconds=eta, attempts=job.attempts,
                   created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
                   error=job.error, results=results, generation_id=job.generation_id,
                   prompt=job.spec.get("asked_prompt") or job.spec["prompt"],
                   params=job.spec.get("params", {}), used=JobUsed(**job.used) if job.used else None)
