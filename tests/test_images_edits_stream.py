"""Streamed edits over real HTTP (shared cluster, tiny models): `POST /v1/images/edits` with
`stream` and `partial_images` sends OpenAI's `image_edit.partial_image` / `image_edit.completed`
events through the same path as generations (serve_app/images/streaming.py), parsed by the official
`openai` client; the final image is the unstreamed edit's; bad values are 400s naming the field;
variations refuse `stream`; clients hanging up at random points leave nothing half-written."""

from __future__ import annotations

import base64
import io
import os
import random
import time

import httpx
import numpy as np
import pytest
import small_app
from PIL import Image
from sqlalchemy import create_engine, func, select
from sse import events as sse_events

from serve_app.library.models import Generation
from serve_app.tenancy.models import BudgetHold, InFlight, InFlightLease, Tenant, UsageEvent
from tests.image_server import gradient_png

pytestmark = pytest.mark.ray

SRC = gradient_png((64, 64))


def _client(url: str, key: str):  # type: ignore[no-untyped-def]
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def _key(auth: dict) -> str:
    return auth["Authorization"].split()[1]


def _pixels(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def _stream_edit(url: str, auth: dict, fields: dict) -> list[tuple[str, dict]]:
    with httpx.stream("POST", url + "/v1/images/edits", headers=auth, data=fields,
                      files={"image": ("cat.png", SRC, "image/png")}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(r.iter_lines()))


def _usage(url: str, auth: dict) -> tuple[int, int]:
    month = httpx.get(url + "/v1/usage", headers=auth, timeout=30).json()["month"]
    return month["requests"], month["images"]


# -- the session app (configs/local.yaml: sdxl-tiny has the tiny preview decoder) ---------------------

def test_openai_client_streams_an_edit_and_it_equals_the_unstreamed_edit(genserve_url: str, auth: dict) -> None:
    client = _client(genserve_url, _key(auth))
    # 8 steps (sdxl-tiny's most) at the default --iw 1 strength (0.667): 5 run, previews after steps 2 and 3.
    stream = client.images.edit(image=("cat.png", SRC, "image/png"), prompt="a cat in a hat", model="sdxl-tiny",
                                size="64x48", stream=True, partial_images=2, extra_body={"steps": 8, "seed": 11})
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"], events
    partials, done = events[:2], events[2]
    assert [p.partial_image_index for p in partials] == [0, 1]
    for p in partials:
        assert p.size == "64x48" and p.output_format == "png" and p.background == "opaque" and p.quality == "auto"
        assert _pixels(p.b64_json).shape == (48, 64, 3) and p.created_at > 1_700_000_000
    steps = [(p.model_extra or {})["step"] for p in partials]
    assert steps == [2, 3] and {(p.model_extra or {})["total_steps"] for p in partials} == {5}, steps
    assert done.size == "64x48" and done.usage.total_tokens == 0 and (done.usage.model_extra or {})["images"] == 1
    assert (done.model_extra or {})["seed"] == 11
    sync = client.images.edit(image=("cat.png", SRC, "image/png"), prompt="a cat in a hat", model="sdxl-tiny",
                              size="64x48", extra_body={"steps": 8, "seed": 11})
    assert np.array_equal(_pixels(done.b64_json), _pixels(sync.data[0].b64_json))


@pytest.mark.parametrize("partial_images", [0, 2])
def test_event_sequence_and_count_per_image(genserve_url: str, auth: dict, partial_images: int) -> None:
    fields = {"prompt": "two cats", "n": "2", "size": "48x48", "steps": "8", "seed": "5", "strength": "1",
              "stream": "true", "partial_images": str(partial_images)}
    events = _stream_edit(genserve_url, auth, fields)
    assert all(name == data["type"] for name, data in events), events
    assert len(events) == 2 * (partial_images + 1), [d["type"] for _, d in events]
    for i in (0, 1):
        mine = [d for _, d in events if d["image_index"] == i]
        assert [d["type"] for d in mine] == ["image_edit.partial_image"] * partial_images + ["image_edit.completed"]
        assert [d["partial_image_index"] for d in mine[:-1]] == list(range(partial_images))
    completed = {d["seed"]: d for _, d in events if d["type"] == "image_edit.completed"}
    assert sorted(completed) == [5, 6]
    # The same images as the unstreamed edit (each image its own seed).
    sync = httpx.post(genserve_url + "/v1/images/edits", headers=auth, timeout=120,
                      data={k: v for k, v in fields.items() if k not in ("stream", "partial_images")},
                      files={"image": ("cat.png", SRC, "image/png")})
    assert sync.status_code == 200, sync.text
    for d in sync.json()["data"]:
        assert np.array_equal(_pixels(completed[d["seed"]]["b64_json"]), _pixels(d["b64_json"])), d["seed"]


def test_a_streamed_image_prompt_draws_from_its_image(genserve_url: str, auth: dict) -> None:
    """The stream hands the input images to the replica as the unstreamed route does (generations)."""
    client = _client(genserve_url, _key(auth))
    up = client.files.create(file=("cat.png", SRC, "image/png"), purpose="vision")
    body = {"prompt": f"{up.id} a cat --iw 1", "size": "48x48", "steps": 6, "seed": 3}
    with httpx.stream("POST", genserve_url + "/v1/images/generations", headers=auth, timeout=120,
                      json={**body, "stream": True, "partial_images": 1}) as r:
        assert r.status_code == 200, r.read()
        events = [d for _, d in sse_events(r.iter_lines())]
    assert [d["type"] for d in events] == ["image_generation.partial_image", "image_generation.completed"], events
    sync = httpx.post(genserve_url + "/v1/images/generations", headers=auth, json=body, timeout=120)
    assert sync.status_code == 200, sync.text
    assert np.array_equal(_pixels(events[-1]["b64_json"]), _pixels(sync.json()["data"][0]["b64_json"]))


EDIT_REFUSED = [
    ({"stream": "true", "partial_images": "4"}, "partial_images", None),
    ({"stream": "true", "partial_images": "-1"}, "partial_images", None),
    ({"stream": "true", "partial_images": "two"}, "partial_images", None),
    ({"stream": "true", "partial_images": ""}, "partial_images", None),
    ({"stream": "maybe"}, "stream", None),
    ({"partial_images": "2"}, "partial_images", "partial_images_without_stream"),
    ({"stream": "false", "partial_images": "1"}, "partial_images", "partial_images_without_stream"),
    ({"stream": "true", "response_format": "url"}, "response_format", "unsupported_with_stream"),
]


@pytest.mark.parametrize("fields, param, code", EDIT_REFUSED)
def test_edit_refusals_name_the_field_and_cost_nothing(genserve_url: str, auth: dict, fields: dict, param: str,
                                                       code: str | None) -> None:
    used = _usage(genserve_url, auth)
    r = httpx.post(genserve_url + "/v1/images/edits", headers=auth, data={"prompt": "a cat", **fields},
                   files={"image": ("cat.png", SRC, "image/png")}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] and err["message"] and "Traceback" not in r.text, err
    if code:
        assert err["code"] == code, err
    assert _usage(genserve_url, auth) == used


def test_variations_refuse_stream_and_partial_images(genserve_url: str, auth: dict) -> None:
    variations = genserve_url + "/v1/images/variations"
    image = {"image": ("cat.png", SRC, "image/png")}
    for fields, param in [({"stream": "true"}, "stream"), ({"stream": "yes"}, "stream"),
                          ({"stream": "true", "partial_images": "2"}, "stream"),
                          ({"partial_images": "2"}, "partial_images")]:
        r = httpx.post(variations, headers=auth, data={"size": "32x32", **fields}, files=image, timeout=60)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == param, (fields, r.text)
        assert err["code"] == ("unsupported" if param == "stream" else "unknown_field"), err
    r = httpx.post(variations, headers=auth, data={"size": "32x32", "stream": "false"}, files=image, timeout=60)
    assert r.status_code == 200 and len(r.json()["data"]) == 1, r.text


# -- a small app of its own: long runs on one replica, and its own database to inspect ------------------

@pytest.fixture(scope="module")
def app(genserve_url: str, tiny_models_dir, tmp_path_factory):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("editstream")
    a = small_app.deploy("editstream", base_url=genserve_url, work_dir=work, models_dir=tiny_models_dir,
                         plans=[{"name": "open", **small_app.UNLIMITED}], tenants={"carol": "open"},
                         model={"max_steps": 500, "previews": {"vae": str(tiny_models_dir / "taesd-tiny")}})
    a.work_dir = work  # type: ignore[attr-defined]
    yield a
    a.delete()


def _state(engine, tenant: str) -> dict:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        tid = conn.execute(select(Tenant.id).where(Tenant.name == tenant)).scalar_one()

        def count(model, *where) -> int:  # type: ignore[no-untyped-def]
            return conn.execute(select(func.count()).select_from(model).where(model.tenant_id == tid, *where)).scalar()

        return {
            "in_flight": conn.execute(select(func.coalesce(func.sum(InFlight.count), 0))
                                      .where(InFlight.tenant_id == tid)).scalar(),
            "leases": count(InFlightLease), "holds": count(BudgetHold), "generations": count(Generation),
            "events": [tuple(row) for row in conn.execute(
                select(UsageEvent.status, UsageEvent.images, UsageEvent.gpu_seconds).where(UsageEvent.tenant_id == tid))],
        }


def test_clients_hanging_up_mid_edit_leave_nothing_half_written(app: small_app.SmallApp) -> None:
    seed = int(os.environ.get("GENSERVE_CANCEL_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    points = [rng.choice([0, 1, 2]) for _ in range(4)]  # partial images read before hanging up
    why = f"GENSERVE_CANCEL_SEED={seed} points={points}"
    engine = create_engine(f"sqlite:///{app.work_dir / 'genserve.db'}")  # type: ignore[attr-defined]
    before = app.stats()
    fields = {"prompt": "a long edit", "size": "48x48", "steps": "400", "strength": "1", "stream": "true",
              "partial_images": "3"}
    for k in points:
        with httpx.stream("POST", f"{app.url}/v1/images/edits", headers=app.auth("carol"), data=fields,
                          files={"image": ("cat.png", SRC, "image/png")}, timeout=120) as r:
            assert r.status_code == 200, why
            seen = 0
            for name, _ in sse_events(r.iter_lines()) if k else ():  # k = 0: hang up right after the headers
                assert name == "image_edit.partial_image", (why, name)
                seen += 1
                if seen >= k:
                    break
    reached = sum(1 for k in points if k >= 1)  # these surely reached the replica
    deadline = time.monotonic() + 90
    while True:
        stats, state = app.stats(), _state(engine, "carol")
        idle = stats["queued"] == 0 and stats["running"] == 0
        settled = len(state["events"]) == len(points) and not (state["in_flight"] or state["leases"] or state["holds"])
        if idle and settled and stats["images_cancelled"] - before["images_cancelled"] >= reached:
            break
        assert time.monotonic() < deadline, (why, before, stats, state)
        time.sleep(0.2)
    assert stats["images_done"] == before["images_done"], (why, "an image ran to its end for a client gone")
    # Every request is in the ledger once, as `disconnected`, billing no image; no generation was logged.
    assert state["events"] == [("disconnected", 0, 0.0)] * len(points), (why, state)
    assert state["generations"] == 0, (why, state)
    engine.dispose()
