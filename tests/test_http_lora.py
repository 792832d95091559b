"""LoRA adapters through the whole graph over real HTTP (shared cluster, configs/local.yaml):
upload to `/v1/adapters`, `loras` and `<lora:name:w>` on image requests and jobs, Serve's
multiplexed routing to the diffusion replica, isolation between tenants, and the official
`openai` client passing `extra_body={"loras": ...}`."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import httpx
import pytest
from adapter_files import zip_dir
from conftest import ADMIN_TOKEN

pytestmark = pytest.mark.ray
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def upload(url: str, headers: dict, name: str, data: bytes, base: str = "sdxl-tiny") -> httpx.Response:
    return httpx.post(url + "/v1/adapters", headers=headers, data={"name": name, "base_model": base},
                      files={"file": (f"{name}.zip", data, "application/zip")}, timeout=60)


def image(url: str, headers: dict, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/images/generations", json={"seed": 21, **body}, headers=headers, timeout=120)


def png(r: httpx.Response) -> bytes:
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["data"][0]["b64_json"])


def tenant(url: str, name: str) -> dict:
    httpx.post(url + "/admin/tenants", headers=ADMIN, json={"name": name, "plan": "pro"})
    key = httpx.post(f"{url}/admin/tenants/{name}/keys", headers=ADMIN, json={}).json()["key"]
    return {"Authorization": f"Bearer {key}"}


def images_done(url: str) -> int:
    from ray import serve

    return int(serve.get_deployment_handle("Diffusion-sdxl-tiny", app_name="genserve")
               .stats.remote().result()["images_done"])


@pytest.fixture(scope="module")
def loras(genserve_url: str, auth: dict, tiny_models_dir: Path) -> dict[str, str]:
    """The tiny adapters registered for the local tenant: name -> id."""
    ids = {}
    for name in ("ink", "neon"):
        r = upload(genserve_url, auth, f"t-{name}", zip_dir(tiny_models_dir / "sdxl-tiny-loras" / name))
        if r.status_code == 409:  # a rerun on the same session's database
            r = httpx.get(f"{genserve_url}/v1/adapters/t-{name}", headers=auth)
        assert r.status_code in (200, 201), r.text
        assert r.json()["rank"] == 4 and r.json()["kind"] == "diffusion" and r.json()["owned_by"] == "tenant"
        ids[name] = r.json()["id"]
    return ids


def test_adapters_change_images_and_weight_zero_is_the_base(genserve_url: str, auth: dict, loras: dict) -> None:
    base = png(image(genserve_url, auth, {"prompt": "a blue house"}))
    ink = png(image(genserve_url, auth, {"prompt": "a blue house", "loras": [{"name": "t-ink", "weight": 1.0}]}))
    neon = png(image(genserve_url, auth, {"prompt": "a blue house <lora:t-neon:1>"}))
    assert len({base, ink, neon}) == 3
    assert png(image(genserve_url, auth, {"prompt": "a blue house <lora:t-ink:0>"})) == base
    # The prompt form and the field are the same request; the id works as a name too.
    assert png(image(genserve_url, auth, {"prompt": "a blue house <lora:t-ink>"})) == ink
    assert png(image(genserve_url, auth, {"prompt": "a blue house", "loras": [{"name": loras["ink"]}]})) == ink
    assert png(image(genserve_url, auth, {"prompt": "a blue house"})) == base
    r = image(genserve_url, auth, {"prompt": "a blue house <lora:t-ink:0.5>"})
    assert r.json()["genserve"]["loras"] == [{"name": "t-ink", "id": loras["ink"], "weight": 0.5}]
    assert r.json()["data"][0]["revised_prompt"] == "a blue house"


def test_missing_or_foreign_adapter_is_404_before_any_gpu_work(genserve_url: str, auth: dict, loras: dict) -> None:
    other = tenant(genserve_url, "lora-other")
    before = images_done(genserve_url)
    for who, body in ((auth, {"prompt": "x <lora:nope:1>"}),
                      (auth, {"prompt": "x", "loras": [{"name": "nope"}]}),
                      (other, {"prompt": "x <lora:t-ink:1>"}),
                      (other, {"prompt": "x", "loras": [{"name": loras["ink"]}]})):
        r = image(genserve_url, who, body)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "adapter_not_found" and r.json()["error"]["param"].startswith("loras")
    r = httpx.post(genserve_url + "/v1/jobs", headers=other, json={"prompt": "x <lora:t-ink>"}, timeout=30)
    assert r.status_code == 404, r.text
    assert images_done(genserve_url) == before
    # The other tenant sees none of the local tenant's adapters, and can't delete them.
    assert httpx.get(genserve_url + "/v1/adapters", headers=other).json()["data"] == []
    assert httpx.get(f"{genserve_url}/v1/adapters/t-ink", headers=other).status_code == 404
    assert httpx.delete(f"{genserve_url}/v1/adapters/{loras['ink']}", headers=other).status_code == 404
    # Bad input: 4xx with OpenAI-style bodies.
    r = image(genserve_url, auth, {"prompt": "x <lora:t-ink:9>"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "<lora>"
    r = image(genserve_url, auth, {"prompt": "x", "model": "wuerstchen-tiny", "loras": [{"name": "t-ink"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "loras_unsupported"
    r = upload(genserve_url, auth, "junk", b"PK\x03\x04 not really")
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"


def test_jobs_take_loras(genserve_url: str, auth: dict, loras: dict) -> None:
    direct = png(image(genserve_url, auth, {"prompt": "a cat", "loras": [{"name": "t-neon", "weight": 0.8}]}))
    r = httpx.post(genserve_url + "/v1/jobs", headers=auth, timeout=30,
                   json={"prompt": "a cat", "seed": 21, "loras": [{"name": "t-neon", "weight": 0.8}]})
    assert r.status_code in (200, 201, 202), r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 120
    while True:
        job = httpx.get(f"{genserve_url}/v1/jobs/{job_id}", headers=auth).json()
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert job["status"] == "succeeded", job
    url = job["results"][0]["url"]
    got = httpx.get(url if url.startswith("http") else genserve_url + url).content
    assert got == direct


def test_openai_client_passes_loras_in_extra_body(genserve_url: str, api_key: str, loras: dict) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=genserve_url + "/v1", api_key=api_key)
    with_lora = client.images.generate(prompt="a tree", model="sdxl-tiny", response_format="b64_json",
                                       extra_body={"seed": 21, "loras": [{"name": "t-ink", "weight": 1.0}]})
    direct = png(image(genserve_url, {"Authorization": f"Bearer {api_key}"},
                       {"prompt": "a tree", "loras": [{"name": "t-ink", "weight": 1.0}]}))
    assert base64.b64decode(with_lora.data[0].b64_json or "") == direct


def test_a_streamed_request_with_loras_draws_the_unstreamed_image(genserve_url: str, auth: dict, loras: dict) -> None:
    """The stream goes through the same handle as unstreamed calls (`ImagesService.handle_for`:
    multiplexed by adapter set), and its adapters apply."""
    body = {"prompt": "a red boat", "loras": [{"name": "t-ink", "weight": 0.7}]}
    direct = png(image(genserve_url, auth, body))
    assert direct != png(image(genserve_url, auth, {"prompt": "a red boat"}))
    completed = []
    with httpx.stream("POST", genserve_url + "/v1/images/generations", headers=auth, timeout=120,
                      json={"seed": 21, "stream": True, **body}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and '"image_generation.completed"' in line:
                completed.append(json.loads(line[len("data: "):]))
    assert len(completed) == 1
    assert base64.b64decode(completed[0]["b64_json"]) == direct
