"""The whole graph over real HTTP: ingress → batched diffusion on the tiny models (shared cluster)."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.ray


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _post(url: str, body: dict, auth: dict[str, str]) -> httpx.Response:
    return httpx.post(url + "/v1/images/generations", json=body, timeout=120, headers=auth)


def test_generates_pngs_with_parameters(genserve_url: str, auth: dict) -> None:
    r = _post(genserve_url, {"prompt": "a lighthouse at dawn --ar 3:2 --seed 5", "n": 2, "metadata": True}, auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["data"]) == 2 and body["genserve"]["model"] == "sdxl-tiny"
    imgs = [_png(d["b64_json"]) for d in body["data"]]
    assert all(im.format == "PNG" and im.size == (80, 56) for im in imgs)  # 3:2 at ~64² pixels, x8
    assert [d["seed"] for d in body["data"]] == [5, 6]
    assert imgs[0].text["seed"] == "5" and imgs[0].text["prompt"] == "a lighthouse at dawn"
    assert body["data"][0]["revised_prompt"] == "a lighthouse at dawn"
    # Two different seeds → two different images (noise, but not the same noise).
    assert not np.array_equal(np.asarray(imgs[0]), np.asarray(imgs[1]))


def test_png_metadata_from_the_real_path_carries_tile_and_weighted_prompts(genserve_url: str, auth: dict) -> None:
    """The PNG a replica encodes for a real request (route → ImagesService → Diffusion deployment →
    png.image_result) carries every parameter that shaped it, `tile` and the `::` weights included."""
    r = _post(genserve_url, {"prompt": "a red cat::2 green grass::-0.5 --tile --seed 3", "metadata": True}, auth)
    assert r.status_code == 200, r.text
    text = _png(r.json()["data"][0]["b64_json"]).text
    assert text["tile"] == "True" and text["weighted_prompts"] == "a red cat::2 green grass::-0.5", text
    assert (text["seed"], text["prompt"], text["model"]) == ("3", "a red cat", "sdxl-tiny")
    # Without `metadata` (the local plan's default is off) the PNG carries nothing.
    plain = _post(genserve_url, {"prompt": "a red cat::2 green grass::-0.5 --tile"}, auth)
    assert _png(plain.json()["data"][0]["b64_json"]).text == {}


def test_seed_fixes_the_image_alone_or_batched(genserve_url: str, auth: dict) -> None:
    alone = _post(genserve_url, {"prompt": "seeded fox", "seed": 1234, "n": 1}, auth).json()
    # The same seed as the 1st of 4, sent while other requests fill the batch.
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(_post, genserve_url, {"prompt": "seeded fox", "seed": 1234, "n": 4}, auth)] + [
            pool.submit(_post, genserve_url, {"prompt": f"other {i}", "seed": i, "n": 2}, auth) for i in range(3)]
        batched = futs[0].result().json()
        for f in futs[1:]:
            assert f.result().status_code == 200
    assert max(batched["genserve"]["batch_sizes"]) > 1, "images of one request should share a batch"
    a = np.asarray(_png(alone["data"][0]["b64_json"]))
    b = np.asarray(_png(batched["data"][0]["b64_json"]))
    assert np.array_equal(a, b)


def test_second_model_and_template(genserve_url: str, auth: dict) -> None:
    r = _post(genserve_url, {"prompt": "ignored", "model": "wuerstchen-tiny", "template": "portrait",
                             "variables": {"subject": "a fisherman"}, "size": "128x128", "seed": 3}, auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["genserve"]["model"] == "wuerstchen-tiny"
    assert body["data"][0]["revised_prompt"].startswith("Professional portrait of a fisherman")


def test_openai_client_unchanged(genserve_url: str, auth: dict) -> None:
    import openai

    client = openai.OpenAI(base_url=genserve_url + "/v1", api_key=auth["Authorization"].split()[1])
    res = client.images.generate(prompt="a tiny robot", model="sdxl-tiny", n=2, size="64x64",
                                 response_format="b64_json")
    assert len(res.data) == 2 and _png(res.data[0].b64_json).size == (64, 64)
    with pytest.raises(openai.NotFoundError):
        client.images.generate(prompt="x", model="does-not-exist")


def test_models_health_and_render(genserve_url: str, auth: dict) -> None:
    models = httpx.get(genserve_url + "/v1/models", headers=auth).json()
    caps = {m["id"]: m["capability"] for m in models["data"]}
    assert caps["sdxl-tiny"] == "image" and caps["wuerstchen-tiny"] == "image"
    assert all(m["owned_by"] == "genserve" for m in models["data"])
    h = httpx.get(genserve_url + "/health", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok", h.text
    r = httpx.post(genserve_url + "/v1/prompts/render", headers=auth,
                   json={"prompt": "castle::2 fog::1 --ar 2:1 --seed 9 --no people", "n": 2}).json()
    assert (r["width"], r["height"], r["seeds"]) == (88, 48, [9, 10])
    assert r["negative_prompt"] == "people" and r["weighted_prompts"][0] == {"text": "castle", "weight": 2.0}


BAD = [
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "   "}, 400, "prompt"),
    ({"prompt": "x", "size": "7x7"}, 400, "size"),
    ({"prompt": "x", "size": "100000x100000"}, 400, "size"),
    ({"prompt": "x", "size": "big"}, 400, "size"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 11}, 400, "n"),
    ({"prompt": "x", "steps": -1}, 400, "steps"),
    ({"prompt": "x", "model": "unknown"}, 404, "model"),
    ({"prompt": "x --s 9999"}, 422, "--s"),
    ({"prompt": "x --wat"}, 422, "--wat"),
    ({"prompt": "x", "response_format": "png"}, 400, "response_format"),
    ({"prompt": "x", "stepz": 3}, 400, "stepz"),
    ({"prompt": "x", "seed": -5}, 400, "seed"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD)
def test_bad_input_gets_openai_errors(genserve_url: str, auth: dict, body: dict, status: int, param: str) -> None:
    r = _post(genserve_url, body, auth)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert "Traceback" not in r.text


def test_raw_body_errors(genserve_url: str, auth: dict) -> None:
    url = genserve_url + "/v1/images/generations"
    cases = [
        (httpx.post(url, content=b"{not json", headers={**auth, "content-type": "application/json"}), 400),
        (httpx.post(url, content=b'{"prompt": "x", "guidance_scale": NaN}',
                    headers={**auth, "content-type": "application/json"}), 400),
        (httpx.post(url, content=b"prompt=x", headers={**auth, "content-type": "application/x-www-form-urlencoded"}), 400),
        (httpx.post(url, content=b"[1, 2]", headers={**auth, "content-type": "application/json"}), 400),
        (httpx.post(url, json={"prompt": "y" * 100_000}, headers=auth), 413),
        (httpx.get(genserve_url + "/v1/nothing-here", headers=auth), 404),
    ]
    for resp, status in cases:
        assert resp.status_code == status, (resp.request.content[:40], resp.text)
        assert "error" in resp.json() and "Traceback" not in resp.text
    # A body that lies about its size is still cut off at the limit.
    def chunks():
        for _ in range(20):
            yield b" " * 8192
    r = httpx.post(url, content=chunks(), headers={**auth, "content-type": "application/json"})
    assert r.status_code == 413, r.text


def test_concurrent_bad_requests_never_500(genserve_url: str, auth: dict) -> None:
    # Many bad requests at once never produce a 500.
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: _post(genserve_url, {"prompt": f"x --c {200 + i}"}, auth).status_code,
                              range(16)))
    assert set(codes) == {422}


def test_everything_but_health_needs_a_key(genserve_url: str, auth: dict) -> None:
    for method, path in [("POST", "/v1/images/generations"), ("GET", "/v1/models"), ("POST", "/v1/prompts/render"),
                         ("GET", "/v1/usage")]:
        r = httpx.request(method, genserve_url + path, json={"prompt": "x"} if method == "POST" else None)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "missing_api_key"
    bad = httpx.get(genserve_url + "/v1/models", headers={"X-API-Key": "gs-not-a-real-key"})
    assert bad.status_code == 401 and "gs-not-a-real-key" not in bad.text
    assert httpx.get(genserve_url + "/health", timeout=30).status_code == 200


def test_usage_is_recorded_per_request(genserve_url: str, auth: dict) -> None:
    before = httpx.get(genserve_url + "/v1/usage", headers=auth).json()
    r = _post(genserve_url, {"prompt": "count me", "n": 3}, auth)
    assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"]
    after = httpx.get(genserve_url + "/v1/usage", headers=auth).json()
    assert after["today"]["images"] - before["today"]["images"] == 3
    assert after["today"]["requests"] - before["today"]["requests"] == 1


def test_image_over_the_replica_memory_budget_is_refused_before_it_runs(genserve_url: str, auth: dict) -> None:
    # conftest caps wuerstchen-tiny's batch at 0.05 MP: 256² (0.066 MP) could never fit one batch.
    before = httpx.get(genserve_url + "/v1/usage", headers=auth).json()
    for path, body in [("/v1/images/generations", {"prompt": "x", "model": "wuerstchen-tiny", "size": "256x256"}),
                       ("/v1/jobs", {"prompt": "x", "model": "wuerstchen-tiny", "size": "256x256"})]:
        r = httpx.post(genserve_url + path, json=body, headers=auth, timeout=60)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "exceeds_memory_budget" and err["param"] == "size" and "0.05" in err["message"]
    ok = _post(genserve_url, {"prompt": "x", "model": "wuerstchen-tiny", "size": "128x128", "n": 4}, auth)
    assert ok.status_code == 200, ok.text
    assert max(ok.json()["genserve"]["batch_sizes"]) <= 3  # 3 x 0.016 MP per batch at most
    after = httpx.get(genserve_url + "/v1/usage", headers=auth).json()
    assert after["today"]["requests"] - before["today"]["requests"] == 1  # the refused ones cost nothing
