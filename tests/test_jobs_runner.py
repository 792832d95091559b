"""The job runner's heartbeat on a real SQLite job store (no Ray: a stand-in for the diffusion
handle). A job that has just ended is no longer "held" by its runner, yet its task still has work
to do (the terminal hook that schedules the webhook, the usage settlement): the heartbeat must
leave that task alone, and still cancel a job whose lease went to another runner. `stop()` returns
only once the tasks it cancelled have ended.

The race is made deterministic, not timed: the store blocks the runner's read of the finished job
(the terminal hook's lookup) until the test has run a heartbeat."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from pathlib import Path

import anyio
from sqlalchemy import insert, update

from deployments.diffusion.types import ImageResult
from serve_app.images.service import _streamed
from serve_app.images.spec import ImageSpec
from serve_app.jobs.config import JobsConfig
from serve_app.jobs.models import TERMINAL, Job
from serve_app.jobs.runner import JobRunner
from serve_app.jobs.store import JobRecord, JobStore
from serve_app.tenancy.db import make_engine, upgrade
from serve_app.tenancy.models import Tenant

TASK = {"prompt": "a lighthouse", "negative_prompt": "", "seed": 7, "width": 32, "height": 32, "steps": 2,
        "guidance_scale": 5.0}
SPEC = {"model": "m", "prompt": "a lighthouse", "negative_prompt": "", "tasks": [TASK], "tenant": "acme",
        "base_url": None, "params": {}}


class Stream:
    """Like Serve's `DeploymentResponseGenerator`: async-iterable, with `cancel()`."""

    def __init__(self, events) -> None:  # type: ignore[no-untyped-def]
        self.events = events
        self.cancelled = False

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self):  # type: ignore[no-untyped-def]
        return await self.events.__anext__()

    def cancel(self) -> None:
        self.cancelled = True


class Diffusion:
    """Stands in for the diffusion deployment's handle: streams a progress event and an image per
    task; with `gate`, holds the stream after its first event until the gate opens."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.gate = gate
        self.started = asyncio.Event()

    def options(self, **_: object) -> Diffusion:
        return self

    @property
    def generate_stream(self) -> Diffusion:
        return self

    def remote(self, task):  # type: ignore[no-untyped-def]
        return Stream(self._events(task))

    async def _events(self, task):  # type: ignore[no-untyped-def]
        yield {"step": 1, "total": task.steps}
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        yield ImageResult(png=b"png", seed=task.seed, width=task.width, height=task.height, steps=task.steps,
                          guidance_scale=task.guidance_scale, model="m", batch_size=1)


def execute_on(diffusion: Diffusion):  # type: ignore[no-untyped-def]
    """What `Jobs` passes the runner, on the stand-in handle: the stored spec's images, streamed.
    (SPEC is a job row in the shape stored before `ImageSpec`: it must still load and run.)"""

    async def execute(job: JobRecord, progress) -> list[ImageResult]:  # type: ignore[no-untyped-def]
        return await _streamed(diffusion, ImageSpec.from_stored(job.spec).tasks(), progress)

    return execute


class GatedStore(JobStore):
    """Blocks the first read of a finished job (the runner looking it up for the terminal hook)
    until `release` is set; `reading_finished` says the runner got there."""

    def __init__(self, engine) -> None:  # type: ignore[no-untyped-def]
        super().__init__(engine)
        self.reading_finished = threading.Event()
        self.release = threading.Event()

    def get(self, job_id: str, tenant_id: int | None = None) -> JobRecord | None:
        job = super().get(job_id, tenant_id)
        if job is not None and job.status in TERMINAL and not self.reading_finished.is_set():
            self.reading_finished.set()
            self.release.wait(60)
        return job


def _engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    upgrade(engine)
    return engine


def _tenant(engine) -> int:  # type: ignore[no-untyped-def]
    with engine.begin() as conn:
        return conn.execute(insert(Tenant).values(name="acme", plan="pro", created_at=datetime.now(UTC))
                            ).inserted_primary_key[0]


async def test_heartbeat_lets_a_job_that_just_succeeded_run_its_hook_and_settle_usage(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    store = GatedStore(engine)
    hooked: list[JobRecord] = []
    hook_ran = asyncio.Event()
    settled: list[tuple[str, int]] = []

    async def terminal_hook(job: JobRecord) -> None:
        hooked.append(job)
        hook_ran.set()

    async def settle(status: str, results: list[ImageResult]) -> None:
        settled.append((status, len(results)))

    runner = JobRunner(store, execute=execute_on(Diffusion()), config=JobsConfig(), terminal_hook=terminal_hook)
    try:
        job = await runner.submit(tenant_id=_tenant(engine), model="m", spec=SPEC, webhook_url=None, settle=settle)
        task = runner._running[job.id]
        # The job is `succeeded` in the database; its task is reading it back for the hook.
        assert await anyio.to_thread.run_sync(store.reading_finished.wait, 60)
        await runner._heartbeat()  # sees the job no longer held: it ended, it was not lost
        store.release.set()
        await asyncio.wait([task], timeout=60)
        assert task.done() and not task.cancelled()
        assert settled == [("ok", 1)]  # usage settled
        await asyncio.wait_for(hook_ran.wait(), 10)  # the webhook's hook ran, on the final record
        assert [(j.id, j.status) for j in hooked] == [(job.id, "succeeded")]
    finally:
        store.release.set()
        await runner.stop()
        engine.dispose()


async def test_heartbeat_still_cancels_a_job_whose_lease_went_to_another_runner(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    store = JobStore(engine)
    diffusion = Diffusion(gate=asyncio.Event())  # never opens: the job runs until cancelled
    settled: list[str] = []

    async def settle(status: str, results: list[ImageResult]) -> None:
        settled.append(status)

    runner = JobRunner(store, execute=execute_on(diffusion), config=JobsConfig())
    try:
        job = await runner.submit(tenant_id=_tenant(engine), model="m", spec=SPEC, webhook_url=None, settle=settle)
        task = runner._running[job.id]
        await asyncio.wait_for(diffusion.started.wait(), 60)
        # Our lease lapsed (an overloaded replica) and another runner claimed the job.
        with engine.begin() as conn:
            conn.execute(update(Job).where(Job.id == job.id).values(lease_expires_at=0.0))
        assert store.claim(job.id, "other-runner", 60) is not None
        await runner._heartbeat()
        await asyncio.wait([task], timeout=60)
        assert task.cancelled()
        assert settled == ["cancelled"]
        after = store.get(job.id)
        assert (after.status, after.lease_owner) == ("running", "other-runner")  # left to its new owner
    finally:
        await runner.stop()
        engine.dispose()


async def test_stop_waits_for_the_tasks_it_cancels(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    store = JobStore(engine)
    diffusion = Diffusion(gate=asyncio.Event())
    settled: list[str] = []

    async def settle(status: str, results: list[ImageResult]) -> None:
        settled.append(status)

    runner = JobRunner(store, execute=execute_on(diffusion), config=JobsConfig())
    try:
        runner.start()
        job = await runner.submit(tenant_id=_tenant(engine), model="m", spec=SPEC, webhook_url=None, settle=settle)
        task = runner._running[job.id]
        await asyncio.wait_for(diffusion.started.wait(), 60)
        await runner.stop()
        # The cancelled task's wrap-up (ending the job, releasing the usage reservation) is done.
        assert task.done() and settled == ["cancelled"]
        assert store.get(job.id).status not in ("queued", "running")
    finally:
        await runner.stop()
        engine.dispose()
