"""A job's record says what it actually ran with (`used`), as a synchronous response's `genserve`
block does: a job accepted while its replica is degraded says `degraded: true, reason: "load"`
with the lowered steps; one run in calm says `degraded: false` with the full steps.

A small app with one replica (tests/small_app.py) and hysteresis that holds: degrade above 1.0
batch of load, restore only after 10 minutes of no load, so once the replica reports `degraded`
it stays degraded for the rest of the module, whatever the machine's speed.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import small_app
from test_jobs import wait_job

pytestmark = pytest.mark.ray

PLANS = [{"name": "std", "priority": 0, **small_app.UNLIMITED}]
QUALITY = {"enabled": True, "high_water": 1.0, "low_water": 0.0, "hold_s": 600, "min_steps_fraction": 0.5,
           "min_steps": 1}


@pytest.fixture(scope="module")
def app(genserve_url: str, tiny_models_dir, tmp_path_factory):
    a = small_app.deploy("jobq", base_url=genserve_url, work_dir=tmp_path_factory.mktemp("jobq"),
                         models_dir=tiny_models_dir, plans=PLANS, tenants={"acme": "std"},
                         model={"default_steps": 4, "adaptive_quality": QUALITY,
                                "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01}})
    yield a
    a.delete()


def _job(app: small_app.SmallApp, body: dict) -> dict:
    r = httpx.post(app.url + "/v1/jobs", headers=app.auth("acme"), timeout=30,
                   json={"prompt": "a lighthouse", "size": "32x32", **body})
    assert r.status_code == 202, r.text
    assert "used" not in r.json()  # nothing ran yet
    done = wait_job(app.url, app.auth("acme"), r.json()["id"])
    assert done["status"] == "succeeded", done
    return done


def _overload(app: small_app.SmallApp) -> None:
    """Burst until the replica reports itself degraded (load > 1 batch of 4)."""
    body = {"prompt": "load", "size": "32x32", "n": 4, "steps": 8}  # explicit steps: never degraded itself
    with ThreadPoolExecutor(4) as pool:
        burst = [pool.submit(httpx.post, app.url + "/v1/images/generations", json=body,
                             headers=app.auth("acme"), timeout=120) for _ in range(4)]
        deadline = time.monotonic() + 60
        while not app.stats()["degraded"]:
            assert time.monotonic() < deadline, app.stats()
            time.sleep(0.05)
        assert all(f.result().status_code == 200 for f in burst)


def test_job_record_says_full_quality_then_degraded(app: small_app.SmallApp) -> None:
    calm = _job(app, {"n": 2, "quality": "auto"})
    assert calm["used"] == {"model": "jobq-tiny", "width": 32, "height": 32, "steps_used": [4, 4],
                            "requested_steps": [4, 4], "degraded": False}
    assert calm["params"]["steps"] == 4

    _overload(app)
    assert app.stats()["degraded"]  # held: no restore for 10 minutes
    degraded = _job(app, {"n": 2, "quality": "auto"})
    assert degraded["used"] == {"model": "jobq-tiny", "width": 32, "height": 32, "steps_used": [2, 2],
                                "requested_steps": [4, 4], "degraded": True, "reason": "load"}
    assert degraded["params"]["steps"] == 4  # what was asked stays in params

    # An explicit step count is never lowered, even on a degraded replica; the record says so.
    explicit = _job(app, {"steps": 4})
    assert explicit["used"]["steps_used"] == [4] and explicit["used"]["degraded"] is False
    listed = httpx.get(app.url + "/v1/jobs?limit=3", headers=app.auth("acme")).json()["data"]
    assert [j["used"]["degraded"] for j in listed] == [False, True, False]  # newest first
