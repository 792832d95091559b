"""Runs jobs through the Serve graph from inside each ingress replica.

No new queue: a job is executed by the replica that accepted it, as ordinary streaming calls to
the diffusion deployment's handle (Serve routes, batches and applies backpressure). What a queue
would add, durability, comes from the database: each active job is leased to one replica, which
renews the lease while it works. A background loop in every replica:
  - renews its leases and stops jobs whose lease it lost;
  - claims jobs whose lease expired (their replica died), re-running them from their stored spec,
    or failing them with a reason once `max_attempts` runs were used.

Cancel (`DELETE /v1/jobs/{id}`) sets the row's `cancel_requested`; a queued job ends at once and can
no longer be claimed. A running job is stopped by its runner: at once when the DELETE came to the
replica running it (`cancel`), else within `cancel_poll_s` (a second loop reads the flags). Stopping
cancels the job's Serve calls (`DeploymentResponseGenerator.cancel()`; an awaiting task that is
cancelled does not cancel the remote call by itself), and the diffusion replica drops each image at
its next denoising step. A cancelled job records no images and bills nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from deployments.diffusion.types import ImageResult
from serve_app.errors import is_backend_at_capacity
from serve_app.jobs.config import JobsConfig
from serve_app.jobs.store import CANCELLED_REASON, JobRecord, JobStore
from telemetry import metrics, tracing

logger = logging.getLogger("genserve.jobs")

# Runs one attempt of a job: its images, reporting the fraction of steps done (jobs/service.py
# passes `ImagesService.run` over the job's stored spec).
Execute = Callable[[JobRecord, Callable[[float], Awaitable[None]]], Awaitable[list[ImageResult]]]


class JobRunner:
    def __init__(self, store: JobStore, *, execute: Execute, config: JobsConfig,
                 finish_hook: Callable[[JobRecord, list[ImageResult]], Awaitable[dict]] | None = None,
                 terminal_hook: Callable[[JobRecord], Awaitable[None]] | None = None,
                 orphan_usage: Callable[[JobRecord, list[ImageResult]], Awaitable[None]] | None = None,
                 owner: str | None = None) -> None:
        self.store = store
        self.execute = execute
        self.config = config
        # Stores results and logs the generation; returns {"result_keys", "generation_id"}.
        self.finish_hook = finish_hook
        # Called once per job that this replica moved to a terminal state (webhooks, metrics).
        self.terminal_hook = terminal_hook
        # Records usage of a job this replica finished but did not accept (no admission here).
        self.orphan_usage = orphan_usage
        self.owner = owner or f"ingress-{uuid.uuid4().hex[:12]}"
        self._running: dict[str, asyncio.Task] = {}
        # Tasks done with their work that are ending their job (finish, terminal hook, usage). Once
        # ended, a job is no longer "held" by this runner, but these must not be cancelled.
        self._ending: set[asyncio.Task] = set()
        self._settle: dict[str, Callable[[str, list[ImageResult]], Awaitable[None]]] = {}
        self._loop_task: asyncio.Task | None = None
        self._cancel_task: asyncio.Task | None = None
        # Terminal-hook tasks (webhooks): referenced until done, since the event loop keeps only
        # weak references to tasks and an unreferenced one can vanish mid-flight.
        self._hooks: set[asyncio.Task] = set()
        self._seconds_per_image = config.default_seconds_per_image

    # -- public --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._maintenance_loop())
        if self._cancel_task is None:
            self._cancel_task = asyncio.get_running_loop().create_task(self._cancel_loop())

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel the loop and the running jobs, then wait for their wrap-up (each cancelled run
        still ends its job and releases its usage); bounded, so a stuck database can't hold it up."""
        tasks = [t for t in [self._loop_task, self._cancel_task, *self._running.values()] if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        if self._hooks:  # webhooks already started are let finish (their own retries are bounded)
            await asyncio.wait(set(self._hooks), timeout=timeout_s)

    async def submit(self, *, tenant_id: int, model: str, spec: dict[str, Any], webhook_url: str | None,
                     settle: Callable[[str, list[ImageResult]], Awaitable[None]] | None = None) -> JobRecord:
        job = await anyio.to_thread.run_sync(lambda: self.store.create(
            tenant_id=tenant_id, model=model, spec=spec, owner=self.owner, lease_s=self.config.lease_s,
            max_attempts=self.config.max_attempts, webhook_url=webhook_url))
        if settle is not None:
            self._settle[job.id] = settle
        self._spawn(job.id)
        return job

    def cancel(self, job_id: str) -> bool:
        """Stop this replica's run of `job_id` now (its cancel is already in the database). False
        when it does not run here, or is past its work (ending: the images are all done)."""
        task = self._running.get(job_id)
        if task is None or task in self._ending or task.done():
            return False
        task.cancel()
        return True

    async def wait_ended(self, job_id: str, timeout_s: float) -> None:
        """Wait (bounded) until this replica's run of `job_id` is over."""
        task = self._running.get(job_id)
        if task is not None:
            await asyncio.wait({task}, timeout=timeout_s)

    def estimated_seconds(self, queue_position: int, n_images: int) -> float:
        return round((queue_position + 1) * n_images * self._seconds_per_image, 1)

    @property
    def running(self) -> list[str]:
        return list(self._running)

    # -- execution ------------------------------------------------------------------------------

    def _spawn(self, job_id: str, delay_s: float = 0.0) -> None:
        if job_id in self._running:
            return
        # A span per run; spawned from a request, it continues that request's trace.
        task = asyncio.get_running_loop().create_task(tracing.traced(self._run(job_id, delay_s), "job.run",
                                                                     job_id=job_id, owner=self.owner))
        self._running[job_id] = task

        def done(t: asyncio.Task) -> None:
            self._ending.discard(t)
            if self._running.get(job_id) is t:
                self._running.pop(job_id)

        task.add_done_callback(done)

    async def _run(self, job_id: str, delay_s: float) -> None:
        try:
            if delay_s:
                await asyncio.sleep(delay_s)
            job = await anyio.to_thread.run_sync(self.store.claim, job_id, self.owner, self.config.lease_s)
        except asyncio.CancelledError:  # cancelled while waiting to (re)start
            with anyio.CancelScope(shield=True):
                await self._settle_usage(job_id, "cancelled", [])
            raise
        if job is None:  # cancelled while queued, or another replica holds it
            self._mark_ending()
            # Cancel requested while it was back in the queue (a retry) or orphaned: end it here.
            if await anyio.to_thread.run_sync(self.store.end_cancelled, job_id, self.owner):
                await self.announce(job_id)
            await self._settle_usage(job_id, "cancelled", [])
            return
        started = time.monotonic()
        try:
            if job.cancel_requested:  # cancelled between the claim and its read: never call the model
                raise asyncio.CancelledError
            results = await self._execute(job)
            # Every image is done: a cancel arriving now has no step left to stop, so the job is
            # delivered (and billed) rather than its finished images thrown away.
            self._mark_ending()
            outcome = await self.finish_hook(job, results) if self.finish_hook else {}
        except asyncio.CancelledError:
            # The client's cancel (here, or seen in the row), or the lease went to someone else
            # (then `finish` below finds the job not ours and changes nothing).
            with anyio.CancelScope(shield=True):
                await self._end(job, "cancelled", error=CANCELLED_REASON)
                await self._settle_usage(job_id, "cancelled", [])
            raise
        except Exception as e:  # noqa: BLE001 - every failure ends as a retry or a reason
            await self._on_failure(job, e)
            return
        n = max(1, len(results))
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * (time.monotonic() - started) / n
        await self._end(job, "succeeded", **outcome)
        if job_id in self._settle:
            await self._settle_usage(job_id, "ok", results)
        elif self.orphan_usage is not None:
            await self._guarded(self.orphan_usage(job, results))

    async def _execute(self, job: JobRecord) -> list[ImageResult]:
        last_write = 0.0

        async def progress(fraction: float) -> None:
            nonlocal last_write
            now = time.monotonic()
            if now - last_write > 0.5:  # progress writes are throttled, not every step
                last_write = now
                await anyio.to_thread.run_sync(self.store.set_progress, job.id, self.owner, round(0.99 * fraction, 4))

        return await self.execute(job, progress)

    async def _on_failure(self, job: JobRecord, exc: Exception) -> None:
        name = type(exc).__name__
        reason = f"{name}: {exc}".strip()[:500]
        if is_backend_at_capacity(exc):  # Serve's "try again later": back to the queue, no attempt spent
            logger.info("job %s: model at capacity, back to the queue", job.id)
            await anyio.to_thread.run_sync(lambda: self.store.release(job.id, self.owner, error=None))
            self._respawn_later(job.id)
            return
        if job.attempts < job.max_attempts and not isinstance(exc, ValueError):
            logger.warning("job %s attempt %d/%d failed (%s); retrying", job.id, job.attempts, job.max_attempts,
                           reason)
            await anyio.to_thread.run_sync(lambda: self.store.release(job.id, self.owner, error=reason))
            self._respawn_later(job.id, self.config.retry_backoff_s * 2 ** (job.attempts - 1))
            return
        await self._end(job, "failed", error=f"failed after {job.attempts} attempt(s): {reason}")
        await self._settle_usage(job.id, "error", [])

    def _respawn_later(self, job_id: str, delay_s: float | None = None) -> None:
        current = self._running.get(job_id)

        def again() -> None:
            if self._running.get(job_id) is current:
                self._running.pop(job_id, None)
            self._spawn(job_id, delay_s if delay_s is not None else self.config.retry_backoff_s)

        asyncio.get_running_loop().call_soon(again)

    def _mark_ending(self) -> None:
        """The current run is past its work and only ends its job now: tell the heartbeat not to
        cancel it. Marked before `finish` commits, so a heartbeat that then finds the job ended
        (no longer held) already sees the mark."""
        task = asyncio.current_task()
        if task is not None:
            self._ending.add(task)

    async def _end(self, job: JobRecord, status: str, **fields: Any) -> None:
        self._mark_ending()
        ok = await anyio.to_thread.run_sync(lambda: self.store.finish(job.id, self.owner, status, **fields))
        if not ok:
            logger.warning("job %s: lease lost before it could be marked %s", job.id, status)
            return
        await self.announce(job.id)

    async def announce(self, job_id: str) -> None:
        """Run the terminal hook (webhook) of a job this replica just ended, in the background."""
        if self.terminal_hook is not None:
            final = await anyio.to_thread.run_sync(self.store.get, job_id)
            if final is not None:
                hook = asyncio.get_running_loop().create_task(self._guarded(self.terminal_hook(final)))
                self._hooks.add(hook)
                hook.add_done_callback(self._hooks.discard)

    async def _settle_usage(self, job_id: str, status: str, results: list[ImageResult]) -> None:
        settle = self._settle.pop(job_id, None)
        if settle is not None:
            await settle(status, results)

    @staticmethod
    async def _guarded(coro: Awaitable[None]) -> None:
        try:
            await coro
        except Exception:  # noqa: BLE001 - a hook's failure must not touch the job
            logger.exception("job terminal hook failed")

    # -- leases -----------------------------------------------------------------------------------

    async def _maintenance_loop(self) -> None:
        next_reap = 0.0
        while True:
            try:
                await self._heartbeat()
                if time.monotonic() >= next_reap:
                    next_reap = time.monotonic() + self.config.reap_interval_s
                    await self._reap()
                    metrics.set_jobs_in_state(await anyio.to_thread.run_sync(self.store.count_by_status))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a DB hiccup must not stop the loop
                logger.exception("job maintenance failed; retrying")
            await asyncio.sleep(self.config.heartbeat_s)

    async def _cancel_loop(self) -> None:
        """Stop the jobs running here whose cancel was requested on any replica (see module doc)."""
        while True:
            try:
                ids = [j for j, t in self._running.items() if t not in self._ending]
                if ids:
                    for job_id in await anyio.to_thread.run_sync(self.store.cancels_requested, ids):
                        if self.cancel(job_id):
                            logger.info("job %s: cancel requested; stopping it", job_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a DB hiccup must not stop the loop
                logger.exception("job cancel poll failed; retrying")
            await asyncio.sleep(self.config.cancel_poll_s)

    async def _heartbeat(self) -> None:
        ids = list(self._running)
        held = await anyio.to_thread.run_sync(self.store.heartbeat, ids, self.owner, self.config.lease_s)
        for job_id in ids:
            task = self._running.get(job_id)
            # Cancel requested, or the lease went to another runner (re-claimed after ours lapsed,
            # or failed by a reaper). A job this runner is ending is not held any more either, but
            # its task still runs the terminal hook (webhook) and settles usage: leave it be.
            if task is not None and task not in self._ending and held.get(job_id, True):
                task.cancel()

    async def _reap(self) -> None:
        for job in await anyio.to_thread.run_sync(self.store.expired):
            if job.id in self._running:
                continue
            if job.attempts >= job.max_attempts:
                reason = (f"lease expired after {job.attempts} attempt(s): the replica running it stopped "
                          f"(last owner {job.lease_owner})")
                if await anyio.to_thread.run_sync(self.store.fail_exhausted, job.id, reason):
                    logger.warning("job %s failed: %s", job.id, reason)
                    if self.terminal_hook is not None:
                        final = await anyio.to_thread.run_sync(self.store.get, job.id)
                        if final is not None:
                            await self._guarded(self.terminal_hook(final))
                continue
            logger.info("job %s: lease of %s expired; re-running", job.id, job.lease_owner)
            self._spawn(job.id)

