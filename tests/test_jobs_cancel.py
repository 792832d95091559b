"""Cancelling jobs through the real graph (issue 17, finding 7): a cancel reaches the diffusion
replica at the next denoising step, from the replica that got the DELETE or from any other one (the
row's `cancel_requested` is the notice), a cancelled job never runs again, and billing matches the
outcome: a cancelled job bills nothing, a succeeded one bills its images.

A small app of its own (one ingress, one diffusion replica) so the replica's counters and the
tenants' usage belong to these tests. "Another replica got the DELETE" is played by this process
writing the cancel into the app's database, which is all such a replica does."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime

import httpx
import pytest
import small_app
from sqlalchemy import update

from serve_app.jobs.models import Job
from serve_app.jobs.store import JobStore
from serve_app.tenancy.config import TenancyConfig
from serve_app.tenancy.db import make_engine

pytestmark = pytest.mark.ray

TERMINAL = {"succeeded", "failed", "cancelled"}
PLANS = [{"name": "flat", **small_app.UNLIMITED}]


@pytest.fixture(scope="module")
def app(genserve_url: str, tiny_models_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("jcancel")
    a = small_app.deploy("jcancel", base_url=genserve_url, work_dir=work, models_dir=tiny_models_dir, plans=PLANS,
                         tenants={"acme": "flat", "bystander": "flat"}, model={"max_steps": 400})
    a.work_dir = work  # type: ignore[attr-defined]
    yield a
    a.delete()


@pytest.fixture(scope="module")
def store(app) -> JobStore:
    """The app's own job table, as another ingress replica sees it."""
    url = TenancyConfig(plans=PLANS, default_plan="flat").resolved_database_url(app.work_dir)
    return JobStore(make_engine(url))


def submit(app, tenant: str, **body) -> dict:
    r = httpx.post(app.url + "/v1/jobs", headers=app.auth(tenant), timeout=30, json={"size": "64x64", **body})
    assert r.status_code == 202, r.text
    return r.json()


def wait_job(app, tenant: str, job_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = httpx.get(f"{app.url}/v1/jobs/{job_id}", headers=app.auth(tenant), timeout=30).json()
        if job["status"] in TERMINAL or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def billed_images(app, tenant: str) -> int:
    return httpx.get(app.url + "/v1/usage", headers=app.auth(tenant), timeout=30).json()["month"]["images"]


def wait_idle(app, store: JobStore, timeout_s: float = 30) -> dict:
    """No active job, and the diffusion replica has nothing queued or running."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = app.stats()
        if store.backlog() == 0 and stats["queued"] == 0 and stats["running"] == 0:
            return stats
        assert time.monotonic() < deadline, (store.backlog(), stats)
        time.sleep(0.2)


@pytest.mark.parametrize("via", ["this replica", "another replica"])
def test_cancel_right_after_submit_stops_the_images(app, store: JobStore, via: str) -> None:
    before, billed = app.stats(), billed_images(app, "acme")
    job = submit(app, "acme", prompt=f"long job cancelled by {via}", n=10, steps=300)
    time.sleep(0.3)
    if via == "this replica":
        r = httpx.delete(f"{app.url}/v1/jobs/{job['id']}", headers=app.auth("acme"), timeout=30)
        assert r.status_code == 200, r.text
    else:
        store.request_cancel(job["id"], store.get(job["id"]).tenant_id)
    done = wait_job(app, "acme", job["id"], timeout_s=30)
    assert done["status"] == "cancelled" and done["error"] == "cancelled by the client", done
    assert done["results"] == []
    after = wait_idle(app, store)
    ran = after["images_done"] - before["images_done"]
    assert ran < 10, f"{ran} of the cancelled job's images were finished"
    assert after["images_cancelled"] - before["images_cancelled"] == 10 - ran
    time.sleep(0.3)  # usage is settled just after the job ends
    assert billed_images(app, "acme") == billed  # a cancelled job bills nothing


def _orphan(store: JobStore, tenant_id: int, model: str, *, status: str, cancel_requested: bool) -> str:
    """A job as a dead replica leaves it: lease expired, so any replica's reaper would (re)run it."""
    task = {"prompt": "orphan", "negative_prompt": "", "seed": 5, "width": 64, "height": 64, "steps": 4,
            "guidance_scale": 5.0}
    job = store.create(tenant_id=tenant_id, model=model, spec={"model": model, "prompt": "orphan",
                       "negative_prompt": "", "tasks": [task], "tenant": "acme", "base_url": None, "params": {}},
                       owner="dead-replica", lease_s=60, max_attempts=3, webhook_url=None)
    with store.engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job.id).values(
            status=status, cancel_requested=cancel_requested, lease_expires_at=time.time() - 1,
            started_at=datetime.now(UTC) if status == "running" else None))
    return job.id


def test_cancelled_before_start_never_runs(app, store: JobStore) -> None:
    """A queued job cancelled before any runner claims it, and a running job whose replica died
    after its cancel was requested: the reaper must end both without calling the model. A control
    job left in the same state is run by the same reaper (so the setup would run them)."""
    tenant_id = store.get(submit(app, "acme", prompt="who am i", steps=2)["id"]).tenant_id
    wait_idle(app, store)
    before, billed = app.stats(), billed_images(app, "acme")
    queued = _orphan(store, tenant_id, app.model, status="queued", cancel_requested=False)
    r = httpx.delete(f"{app.url}/v1/jobs/{queued}", headers=app.auth("acme"), timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    dead_owner = _orphan(store, tenant_id, app.model, status="running", cancel_requested=True)
    control = _orphan(store, tenant_id, app.model, status="queued", cancel_requested=False)
    assert wait_job(app, "acme", control)["status"] == "succeeded"
    assert wait_job(app, "acme", dead_owner)["status"] == "cancelled"
    wait_idle(app, store)
    for job_id in (queued, dead_owner):
        job = store.get(job_id)
        assert job.status == "cancelled" and job.result_keys is None and job.error == "cancelled by the client"
    assert store.get(queued).attempts == 0 and store.get(dead_owner).attempts == 0  # never claimed
    assert app.stats()["images_done"] - before["images_done"] == 1  # the control's image only
    time.sleep(0.3)
    assert billed_images(app, "acme") == billed + 1


def test_randomized_cancels_leave_consistent_jobs_and_billing(app, store: JobStore) -> None:
    """~30 jobs, each cancelled at a random moment (before its claim, mid-run, after it finished,
    or never), here or "on another replica"; another tenant's jobs run beside them."""
    rng = random.Random(17)
    wait_idle(app, store)
    billed = billed_images(app, "acme")
    # The bystander's images, alone first: the same seeds must give the same bytes in the storm.
    reference = submit(app, "bystander", prompt="a calm lake --seed 99", n=2, steps=6)
    reference = wait_job(app, "bystander", reference["id"])
    assert reference["status"] == "succeeded"
    ref_bytes = [httpx.get(r["url"], timeout=30).content for r in reference["results"]]

    jobs: list[tuple[dict, int]] = []  # (job, n)
    lock = threading.Lock()

    def one(i: int, delay_s: float | None, via: str, n: int, steps: int) -> None:
        job = submit(app, "acme", prompt=f"storm {i} --seed {i}", n=n, steps=steps)
        with lock:
            jobs.append((job, n))
        if delay_s is None:
            return
        time.sleep(delay_s)
        if via == "http":
            r = httpx.delete(f"{app.url}/v1/jobs/{job['id']}", headers=app.auth("acme"), timeout=30)
            assert r.status_code == 200, r.text
        else:
            store.request_cancel(job["id"], store.get(job["id"]).tenant_id)

    plans = []
    for i in range(30):
        delay = rng.choice([None, 0.0, rng.uniform(0.0, 0.05), rng.uniform(0.05, 1.5), rng.uniform(1.5, 3.0)])
        plans.append((i, delay, rng.choice(["http", "db"]), rng.randint(1, 3), rng.randint(2, 24)))
    threads = [threading.Thread(target=one, args=p) for p in plans]
    bystanders = []
    for k, t in enumerate(threads):
        t.start()
        if k % 10 == 0:
            bystanders.append(submit(app, "bystander", prompt="a calm lake --seed 99", n=2, steps=6))
        time.sleep(rng.uniform(0.0, 0.1))
    for t in threads:
        t.join(timeout=60)
    assert len(jobs) == 30

    finals = {job["id"]: (wait_job(app, "acme", job["id"]), n) for job, n in jobs}
    statuses = [f["status"] for f, _ in finals.values()]
    assert set(statuses) <= {"succeeded", "cancelled"}, statuses  # no stuck `running`, no failure
    assert "cancelled" in statuses
    for final, n in finals.values():
        if final["status"] == "succeeded":
            assert len(final["results"]) == n and final["progress"] == 1.0
        else:
            assert final["results"] == [] and final["error"] == "cancelled by the client"
    stats = wait_idle(app, store)  # the runner and the replica are back to empty
    assert stats["running"] == 0 and stats["queued"] == 0
    expected = billed + sum(n for final, n in finals.values() if final["status"] == "succeeded")
    deadline = time.monotonic() + 10
    while billed_images(app, "acme") != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert billed_images(app, "acme") == expected  # billed exactly the delivered images
    for b in bystanders:  # the other tenant: unaffected, bit-identical images
        done = wait_job(app, "bystander", b["id"])
        assert done["status"] == "succeeded", done
        assert [httpx.get(r["url"], timeout=30).content for r in done["results"]] == ref_bytes
