"""Streamed partial images over real HTTP (serve_app/images/streaming.py) and job previews
(GET /v1/jobs/{id}/preview): the official `openai` client parsing the stream, the refusals, an
error after the stream started, clients disconnecting at random points (their images stop on the
replica), and a running job's latest preview, tenant-isolated."""

from __future__ import annotations

import base64
import io
import random
import time

import httpx
import numpy as np
import pytest
import small_app
from PIL import Image
from sse import events as sse_events

pytestmark = pytest.mark.ray


def _png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    assert image.format == "PNG"
    return image


# -- the session app (configs/local.yaml: sdxl-tiny has the tiny preview decoder) ---------------------

def test_openai_client_streams_partial_images_then_the_image(genserve_url: str, auth: dict) -> None:
    import openai

    client = openai.OpenAI(base_url=genserve_url + "/v1", api_key=auth["Authorization"].split()[1])
    stream = client.images.generate(prompt="a lighthouse at dawn", model="sdxl-tiny", size="64x48", stream=True,
                                    partial_images=2, extra_body={"steps": 8, "seed": 11})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], events
    partials, done = events[:2], events[2]
    assert [p.partial_image_index for p in partials] == [0, 1]
    for p in partials:
        assert p.size == "64x48" and p.output_format == "png" and p.background == "opaque" and p.quality == "auto"
        assert _png(p.b64_json).size == (64, 48) and p.created_at > 1_700_000_000
    assert (partials[0].model_extra or {})["step"] < (partials[1].model_extra or {})["step"] < 8
    final = _png(done.b64_json)
    assert final.size == (64, 48) and done.size == "64x48"
    assert done.usage.total_tokens == 0 and (done.usage.model_extra or {})["images"] == 1
    # The same image as the unstreamed route draws for this seed: previews change nothing.
    sync = httpx.post(f"{genserve_url}/v1/images/generations", headers=auth, timeout=60, json={
        "prompt": "a lighthouse at dawn", "model": "sdxl-tiny", "size": "64x48", "steps": 8, "seed": 11})
    assert sync.status_code == 200, sync.text
    assert np.array_equal(np.asarray(final), np.asarray(_png(sync.json()["data"][0]["b64_json"])))


def test_n_images_interleave_with_their_index_and_seed(genserve_url: str, auth: dict) -> None:
    body = {"prompt": "two cats", "n": 2, "size": "48x48", "steps": 6, "seed": 5, "stream": True, "partial_images": 1}
    with httpx.stream("POST", f"{genserve_url}/v1/images/generations", headers=auth, json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert all(name == data["type"] for name, data in events), events
    for i in (0, 1):
        mine = [d["type"] for _, d in events if d.get("image_index") == i]
        assert mine == ["image_generation.partial_image", "image_generation.completed"], (i, mine)
    seeds = sorted(d["seed"] for _, d in events if d["type"] == "image_generation.completed")
    assert seeds == [5, 6]


def test_stream_without_partial_images_sends_only_the_image(genserve_url: str, auth: dict) -> None:
    body = {"prompt": "a fox", "size": "32x32", "steps": 4, "stream": True}
    with httpx.stream("POST", f"{genserve_url}/v1/images/generations", headers=auth, json=body, timeout=60) as r:
        events = list(sse_events(r.iter_lines()))
    assert [d["type"] for _, d in events] == ["image_generation.completed"]


@pytest.mark.parametrize("body,status,param,code", [
    ({"partial_images": 2}, 400, "partial_images", "partial_images_without_stream"),
    ({"stream": True, "response_format": "url"}, 400, "response_format", "unsupported_with_stream"),
    ({"stream": True, "partial_images": 4}, 400, "partial_images", None),
    ({"stream": True, "partial_images": 1, "model": "wuerstchen-tiny", "size": "128x128"}, 422, "partial_images",
     "partial_images_unsupported"),
])
def test_refusals_name_the_parameter(genserve_url: str, auth: dict, body: dict, status: int, param: str,
                                     code: str | None) -> None:
    r = httpx.post(f"{genserve_url}/v1/images/generations", headers=auth, json={"prompt": "a cat", **body}, timeout=30)
    err = r.json()["error"]
    assert r.status_code == status and err["param"] == param, (r.status_code, err)
    if code:
        assert err["code"] == code, err
    if "wuerstchen" in str(body):
        assert "wuerstchen-tiny" in err["message"], err


def test_jobs_refuse_stream_and_have_no_preview_without_partial_images(genserve_url: str, auth: dict) -> None:
    r = httpx.post(f"{genserve_url}/v1/jobs", headers=auth, json={"prompt": "a cat", "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream", r.text
    job = httpx.post(f"{genserve_url}/v1/jobs", headers=auth, json={"prompt": "a cat", "steps": 2}).json()
    p = httpx.get(f"{genserve_url}/v1/jobs/{job['id']}/preview", headers=auth)
    assert p.status_code == 404 and p.json()["error"]["code"] == "preview_not_available", p.text
    missing = httpx.get(f"{genserve_url}/v1/jobs/job_nope/preview", headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"


# -- a small app of its own: long runs on one replica whose size limit is below the ingress's -----------

@pytest.fixture(scope="module")
def app(genserve_url: str, tiny_models_dir, tmp_path_factory):  # type: ignore[no-untyped-def]
    a = small_app.deploy("stream", base_url=genserve_url, work_dir=tmp_path_factory.mktemp("stream"),
                         models_dir=tiny_models_dir, plans=[{"name": "open", **small_app.UNLIMITED}],
                         tenants={"alice": "open", "bob": "open"},
                         model={"max_steps": 500, "max_side": 64, "min_side": 32,
                                "previews": {"vae": str(tiny_models_dir / "taesd-tiny")}},
                         # The replica allows 56 px: a 64 px image passes the ingress, then fails on the replica.
                         replica={"max_side": 56})
    yield a
    a.delete()


def test_an_error_after_the_stream_started_is_an_error_event(app: small_app.SmallApp) -> None:
    import openai

    body = {"prompt": "too big for the replica", "size": "64x64", "steps": 2, "stream": True, "partial_images": 1}
    with httpx.stream("POST", f"{app.url}/v1/images/generations", headers=app.auth("alice"), json=body,
                      timeout=60) as r:
        assert r.status_code == 200  # the stream had started: the failure comes as an event
        events = list(sse_events(r.iter_lines()))
    assert [name for name, _ in events] == ["error"], events
    err = events[0][1]
    assert err["type"] == "error" and err["error"]["code"] == "invalid_value" and "56" in err["error"]["message"]
    client = openai.OpenAI(base_url=app.url + "/v1", api_key=app.keys["alice"])
    with pytest.raises(openai.APIError, match="56"):
        list(client.images.generate(prompt="x", size="64x64", stream=True, extra_body={"steps": 2}))


def test_a_disconnecting_client_stops_its_image(app: small_app.SmallApp) -> None:
    rng = random.Random(time.time_ns())
    points = [rng.choice([0, 1, 2]) for _ in range(4)]  # partial images read before hanging up
    before = app.stats()
    body = {"prompt": "a long one", "size": "48x48", "steps": 400, "stream": True, "partial_images": 3}
    for k in points:
        with httpx.stream("POST", f"{app.url}/v1/images/generations", headers=app.auth("alice"), json=body,
                          timeout=120) as r:
            assert r.status_code == 200
            seen = 0
            for name, _ in sse_events(r.iter_lines()) if k else ():  # k = 0: hang up right after the headers
                assert name == "image_generation.partial_image", (points, name)
                seen += 1
                if seen >= k:
                    break
    reached = sum(1 for k in points if k >= 1)  # these surely reached the replica
    deadline = time.monotonic() + 90
    while True:
        stats = app.stats()
        idle = stats["queued"] == 0 and stats["running"] == 0
        if idle and stats["images_cancelled"] - before["images_cancelled"] >= reached:
            break
        assert time.monotonic() < deadline, (points, before, stats)
        time.sleep(0.2)
    assert stats["images_done"] == before["images_done"], (points, "an image ran to its end for a client gone")
    assert stats["previews_decoded"] > before.get("previews_decoded", 0)


def test_a_running_jobs_latest_preview(app: small_app.SmallApp) -> None:
    alice, bob = app.auth("alice"), app.auth("bob")
    r = httpx.post(f"{app.url}/v1/jobs", headers=alice, json={
        "prompt": "a slow lighthouse", "size": "48x40", "steps": 400, "partial_images": 3})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    url = f"{app.url}/v1/jobs/{job_id}/preview"
    deadline = time.monotonic() + 90
    steps: list[int] = []
    while len(set(steps)) < 2:  # at least two different previews while it runs
        p = httpx.get(url, headers=alice)
        if p.status_code == 200:
            assert p.headers["content-type"] == "image/png" and p.headers["cache-control"] == "no-store"
            image = Image.open(io.BytesIO(p.content))
            assert image.size == (48, 40) and p.headers["x-genserve-preview-total"] == "400"
            steps.append(int(p.headers["x-genserve-preview-step"]))
        else:
            assert p.status_code == 404 and p.json()["error"]["code"] == "preview_not_available", p.text
            assert not steps, "a preview disappeared while the job ran"
        assert time.monotonic() < deadline, steps
        time.sleep(0.1)
    assert steps == sorted(steps) and set(steps) <= {100, 200, 300}, steps
    other = httpx.get(url, headers=bob)  # another tenant's job is as absent as a missing one
    assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found"
    assert httpx.get(url, headers=alice, params={"image": 0}).status_code == 200
    assert httpx.get(url, headers=alice, params={"image": 1}).status_code == 404  # it has one image
    httpx.delete(f"{app.url}/v1/jobs/{job_id}", headers=alice)
    deadline = time.monotonic() + 60
    while (job := httpx.get(f"{app.url}/v1/jobs/{job_id}", headers=alice).json())["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    ended = time.monotonic() + 10  # the terminal hook removes the previews right after
    while httpx.get(url, headers=alice).status_code != 404:
        assert time.monotonic() < ended, job
        time.sleep(0.1)
