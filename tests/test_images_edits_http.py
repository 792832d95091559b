"""Images from images over real HTTP (shared cluster, tiny models): OpenAI's edits and variations
through the official `openai` client, `/v1/files` uploads, image prompts and references fetched from
a real server on 127.0.0.1 (allow-listed in tests/conftest.py), jobs that load them again, and the
refusals (param named, OpenAI error shape, nothing charged)."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from tests.image_server import ImageServer, Route, gradient_png, png_bytes

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    s = ImageServer()
    s.add("/cat.png", Route(gradient_png((64, 64))))
    s.add("/style.png", Route(png_bytes((32, 32), (20, 200, 20))))
    s.add("/notes.txt", Route(b"just text", content_type="image/png"))
    yield s
    s.close()


def _client(url: str, auth: dict):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=auth["Authorization"].split()[1], max_retries=0)


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _usage(url: str, auth: dict) -> tuple[int, int]:
    """(requests, images) recorded for the tenant this month."""
    r = httpx.get(url + "/v1/usage", headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    month = r.json()["month"]
    return month["requests"], month["images"]


def test_openai_client_edit_and_variation(genserve_url: str, auth: dict) -> None:
    client = _client(genserve_url, auth)
    src = gradient_png((64, 64))
    res = client.images.edit(image=("cat.png", src, "image/png"), prompt="a cat in a hat", model="sdxl-tiny", n=2,
                             size="64x64", response_format="b64_json", extra_body={"seed": 11})
    assert len(res.data) == 2 and _png(res.data[0].b64_json).size == (64, 64)
    assert [d.model_extra.get("seed") for d in res.data] == [11, 12]
    # A mask (white = repaint), several images (the 2nd is a character reference).
    mask = png_bytes((64, 64), 255, mode="L")
    res = client.images.edit(image=[("a.png", src, "image/png"), ("b.png", png_bytes(), "image/png")],
                             mask=("mask.png", mask, "image/png"), prompt="a dog", size="64x64")
    assert len(res.data) == 1 and _png(res.data[0].b64_json).format == "PNG"
    var = client.images.create_variation(image=("cat.png", src, "image/png"), n=1, size="64x64",
                                         response_format="url")
    assert var.data[0].url and httpx.get(var.data[0].url if var.data[0].url.startswith("http")
                                         else genserve_url + var.data[0].url).status_code == 200


def test_same_seed_and_same_image_give_the_same_png(genserve_url: str, auth: dict) -> None:
    client = _client(genserve_url, auth)
    src = gradient_png((64, 64))
    a, b = (client.images.edit(image=("cat.png", src, "image/png"), prompt="a cat", size="64x64",
                               extra_body={"seed": 5}) for _ in range(2))
    assert a.data[0].b64_json == b.data[0].b64_json


def test_openai_client_errors(genserve_url: str, auth: dict) -> None:
    import openai

    client = _client(genserve_url, auth)
    with pytest.raises(openai.UnprocessableEntityError) as e:  # Würstchen has no img2img, and was named
        client.images.edit(image=("cat.png", gradient_png(), "image/png"), prompt="x", model="wuerstchen-tiny")
    assert e.value.body["param"] == "image" and "wuerstchen-tiny" in e.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.edit(image=("cat.png", b"GIF89a not really", "image/gif"), prompt="x")
    assert e.value.body["param"] == "image" and e.value.body["code"] == "invalid_image"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=("cat.png", gradient_png((64, 64)), "image/png"), prompt="x",
                           mask=("m.png", png_bytes((32, 32), 255, mode="L"), "image/png"))
    assert e.value.body["param"] == "mask"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.create_variation(image=("cat.png", gradient_png(), "image/png"), n=99)
    assert e.value.body["param"] == "n"


def _post(url: str, auth: dict, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/images/generations", json=body, headers=auth, timeout=120)


def test_image_prompt_and_references_from_a_url(genserve_url: str, auth: dict, images: ImageServer) -> None:
    cat, style = images.url("/cat.png"), images.url("/style.png")
    before = len(images.hits)
    r = _post(genserve_url, auth, {"prompt": f"{cat} a cat --iw 2 --sref {style} --sw 500 --seed 3",
                                   "size": "64x64", "steps": 6})  # strength 1/3 of 6 steps: 2 run
    assert r.status_code == 200, r.text
    assert sorted(images.hits[before:]) == ["/cat.png", "/style.png"]  # fetched by the ingress
    # Only an image prompt, no text: img2img from the image alone.
    assert _post(genserve_url, auth, {"prompt": f"{cat} --iw 1"}).status_code == 200
    # The dry run shows the typed flags (it fetches nothing).
    shown = httpx.post(genserve_url + "/v1/prompts/render", headers=auth,
                       json={"prompt": f"{cat} a cat --iw 2 --sref {style}"}).json()
    assert shown["params"]["image_prompts"] == [cat] and shown["params"]["image_weight"] == 2.0


REFUSED = [
    ("http://10.1.2.3/cat.png a cat", 400, "prompt", "invalid_image_url"),  # private, not allow-listed
    ("a cat --sref http://169.254.169.254/latest/meta-data/", 400, "--sref", "invalid_image_url"),
    ("{notes} a cat", 422, "prompt", "invalid_image"),
    ("{missing} a cat", 422, "prompt", "image_fetch_failed"),
    ("file-0000000000000000 a cat", 404, "prompt", "file_not_found"),
    ("{cat} {cat} a cat", 422, "prompt", "too_many_image_prompts"),
    ("a cat --sref {cat} {cat} {cat} {cat} {cat}", 400, "--sref", "too_many_input_images"),
    ("{cat} a cat --model wuerstchen-tiny", 422, "prompt", "model_without_image_input"),
]


@pytest.mark.parametrize("prompt, status, param, code", REFUSED)
def test_refused_inputs_cost_nothing(genserve_url: str, auth: dict, images: ImageServer, prompt: str, status: int,
                                     param: str, code: str) -> None:
    text = prompt.format(cat=images.url("/cat.png"), notes=images.url("/notes.txt"), missing=images.url("/nope.png"))
    used = _usage(genserve_url, auth)
    r = _post(genserve_url, auth, {"prompt": text})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code) and "Traceback" not in r.text
    assert _usage(genserve_url, auth) == used


def test_files_upload_use_and_isolation(genserve_url: str, auth: dict) -> None:
    from conftest import ADMIN_TOKEN

    client = _client(genserve_url, auth)
    up = client.files.create(file=("cat.png", gradient_png((64, 64)), "image/png"), purpose="vision")
    assert up.id.startswith("file-") and up.filename == "cat.png" and up.purpose == "vision" and up.bytes > 0
    assert up.id in [f.id for f in client.files.list()]
    assert client.files.retrieve(up.id).id == up.id
    r = _post(genserve_url, auth, {"prompt": f"{up.id} a cat --iw 1.5", "size": "64x64"})
    assert r.status_code == 200, r.text
    # Another tenant: as if it did not exist.
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    httpx.post(genserve_url + "/admin/tenants", headers=admin, json={"name": "files-other", "plan": "pro"})
    key = httpx.post(genserve_url + "/admin/tenants/files-other/keys", headers=admin, json={}).json()["key"]
    other = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{genserve_url}/v1/files/{up.id}", headers=other).status_code == 404
    assert httpx.delete(f"{genserve_url}/v1/files/{up.id}", headers=other).status_code == 404
    assert up.id not in [f["id"] for f in httpx.get(genserve_url + "/v1/files", headers=other).json()["data"]]
    r = _post(genserve_url, other, {"prompt": f"{up.id} a cat"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "prompt"
    # Deleted: gone for its owner too.
    assert client.files.delete(up.id).deleted
    r = _post(genserve_url, auth, {"prompt": f"{up.id} a cat"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"
    bad = httpx.post(genserve_url + "/v1/files", headers=auth, files={"file": ("x.txt", b"hello", "text/plain")},
                     data={"purpose": "vision"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "file"
    bad = httpx.post(genserve_url + "/v1/files", headers=auth, files={"file": ("x.png", gradient_png(), "image/png")},
                     data={"purpose": "fine-tune"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "purpose"


def _wait_job(url: str, auth: dict, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", headers=auth).json()
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def test_jobs_load_their_images_again(genserve_url: str, auth: dict, images: ImageServer) -> None:
    url = images.add("/job-cat.png", Route(gradient_png((64, 64))))
    r = httpx.post(genserve_url + "/v1/jobs", headers=auth, json={"prompt": f"{url} a cat --iw 2", "steps": 6})
    assert r.status_code == 202, r.text
    done = _wait_job(genserve_url, auth, r.json()["id"])
    assert done["status"] == "succeeded", done
    assert images.hits.count("/job-cat.png") == 2  # at submit (checked) and by the runner (loaded again)
    assert done["params"]["init_image"]["source"] == url and done["params"]["strength"] == pytest.approx(0.3333)
    # An image that changed between submit and run: the job fails, saying why.
    url = images.add("/changing.png", Route(gradient_png((64, 64)), then=png_bytes((64, 64))))
    r = httpx.post(genserve_url + "/v1/jobs", headers=auth, json={"prompt": f"{url} a cat"})
    assert r.status_code == 202, r.text
    done = _wait_job(genserve_url, auth, r.json()["id"])
    assert done["status"] == "failed" and "changed since the request was accepted" in done["error"], done


def test_multipart_shape_errors(genserve_url: str, auth: dict) -> None:
    edits = genserve_url + "/v1/images/edits"
    r = httpx.post(edits, headers=auth, json={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "Content-Type"
    r = httpx.post(edits, headers=auth, data={"prompt": "x"}, files={"other": ("a", b"b")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "other"
    r = httpx.post(edits, headers=auth, data={"prompt": "x", "n": "1"}, files={"mask": ("m.png", png_bytes())})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    r = httpx.post(edits, headers=auth, files={"image": ("a.png", png_bytes())})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(edits, headers=auth, data={"prompt": "x", "strength": "2"}, files={"image": ("a.png", png_bytes())})
    assert r.status_code == 400 and r.json()["error"]["param"] == "strength"
    # The upload cap: image_inputs.max_bytes x max_images + 1 MiB, checked before the body is read.
    r = httpx.post(edits, headers=auth, data={"prompt": "x"}, files={"image": ("a.png", b"\0" * (40 << 20))})
    assert r.status_code == 413


# ---- real img2img on the replica (engine side merged from the img2img branch) ----------------------
def _pixels(b64: str) -> bytes:
    return _png(b64).convert("RGB").tobytes()


def test_the_init_image_and_strength_shape_the_picture(genserve_url: str, auth: dict) -> None:
    client = _client(genserve_url, auth)

    def edit(src: bytes, **extra: object) -> bytes:
        res = client.images.edit(image=("i.png", src, "image/png"), prompt="a cat", size="64x64",
                                 extra_body={"seed": 21, **extra})
        return _pixels(res.data[0].b64_json)

    a = edit(gradient_png((64, 64)))
    assert edit(gradient_png((64, 64))) == a  # same seed + same image: same pixels
    assert edit(png_bytes((64, 64), (0, 90, 200))) != a  # another image: another picture
    # Another strength: another picture (the tiny model's 2 steps: 1 step runs at the default --iw 1
    # strength of 0.667, both at strength 1 — which equals 0.5 there: int(steps x strength) decides).
    assert edit(gradient_png((64, 64)), strength="1") != a
    assert edit(gradient_png((64, 64)), strength="0.5") == a
    txt = httpx.post(genserve_url + "/v1/images/generations", headers=auth, timeout=120,
                     json={"prompt": "a cat", "size": "64x64", "seed": 21}).json()
    assert _pixels(txt["data"][0]["b64_json"]) != a  # not a txt2img in disguise


def test_reference_scale_zero_equals_no_reference(genserve_url: str, auth: dict, images: ImageServer) -> None:
    style = images.url("/style.png")
    plain = _post(genserve_url, auth, {"prompt": "a cat --seed 8", "size": "64x64"})
    zero = _post(genserve_url, auth, {"prompt": f"a cat --seed 8 --sref {style} --sw 0", "size": "64x64"})
    full = _post(genserve_url, auth, {"prompt": f"a cat --seed 8 --sref {style} --sw 1000", "size": "64x64"})
    assert plain.status_code == zero.status_code == full.status_code == 200, (zero.text, full.text)
    p, z, f = (_pixels(r.json()["data"][0]["b64_json"]) for r in (plain, zero, full))
    assert z == p and f != p


def test_no_step_left_is_refused_at_the_ingress(genserve_url: str, auth: dict, images: ImageServer) -> None:
    # --iw 2.5 → strength 1/6; the tiny model's 2 steps x 1/6 leave no step: 422 naming --iw, nothing run.
    r = _post(genserve_url, auth, {"prompt": f"{images.url('/cat.png')} a cat --iw 2.5"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "--iw", r.text
    r = _post(genserve_url, auth, {"prompt": f"{images.url('/cat.png')} a cat --iw 2.5", "steps": 8})  # 1 step
    assert r.status_code == 200, r.text


def test_output_follows_the_image_aspect_unless_a_size_is_given(genserve_url: str, auth: dict) -> None:
    client = _client(genserve_url, auth)
    wide = gradient_png((128, 64))
    res = client.images.edit(image=("w.png", wide, "image/png"), prompt="a cat")
    assert _png(res.data[0].b64_json).size == (88, 48)  # 2:1 at the model's 64² pixels, as --ar 2:1
    res = client.images.edit(image=("w.png", wide, "image/png"), prompt="a cat", size="64x64")
    assert _png(res.data[0].b64_json).size == (64, 64)
    res = client.images.edit(image=("w.png", wide, "image/png"), prompt="a cat --ar 1:2")
    assert _png(res.data[0].b64_json).size == (48, 88)
