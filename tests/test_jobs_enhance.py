"""`enhance` on async jobs (issue 18): the LLM expands the prompt at submit, every result carries
the drawn `revised_prompt`, the chat tokens are admitted and land in the tenant's ledger under the
chat model, and a plan without the chat model gets 403 before anything is stored or billed."""

from __future__ import annotations

import uuid

import httpx
import pytest
from conftest import ADMIN_TOKEN, free_port, local_config_doc
from test_jobs import wait_job

pytestmark = pytest.mark.ray

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def new_tenant(url: str, plan: str = "pro") -> tuple[str, dict[str, str]]:
    name = f"enh-{uuid.uuid4().hex[:6]}"
    r = httpx.post(f"{url}/admin/tenants", headers=ADMIN, json={"name": name, "plan": plan})
    assert r.status_code == 201, r.text
    key = httpx.post(f"{url}/admin/tenants/{name}/keys", headers=ADMIN, json={}).json()["key"]
    return name, {"Authorization": f"Bearer {key}"}


def by_model(url: str, tenant: str) -> dict[str, dict]:
    report = httpx.get(f"{url}/admin/tenants/{tenant}/usage", headers=ADMIN).json()
    return {m["model"]: m for m in report["by_model"]}


def test_job_with_enhance_draws_the_expansion_and_bills_chat_tokens(genserve_url: str) -> None:
    tenant, auth = new_tenant(genserve_url)
    r = httpx.post(genserve_url + "/v1/jobs", headers=auth, timeout=120,
                   json={"prompt": "a red fox --enhance --seed 3", "model": "sdxl-tiny", "n": 2})
    assert r.status_code == 202, r.text
    done = wait_job(genserve_url, auth, r.json()["id"])
    assert done["status"] == "succeeded", done
    assert done["prompt"] == "a red fox"  # as asked; the results say what was drawn
    revised = {res["revised_prompt"] for res in done["results"]}
    assert len(done["results"]) == 2 and len(revised) == 1
    (drawn,) = revised
    assert drawn and drawn != "a red fox" and done["params"]["prompt"] == drawn
    usage = by_model(genserve_url, tenant)
    chat = usage["tiny-chat"]  # the expansion, billed like a chat request of the chat model
    assert chat["prompt_tokens"] > 0 and chat["completion_tokens"] > 0 and chat["images"] == 0
    assert usage["sdxl-tiny"]["images"] == 2 and usage["sdxl-tiny"]["prompt_tokens"] == 0

    # Without enhance the results still carry revised_prompt: the rendered prompt, as the sync route.
    plain = httpx.post(genserve_url + "/v1/jobs", headers=auth, timeout=30,
                       json={"prompt": "a red fox --seed 3", "model": "sdxl-tiny"}).json()
    plain = wait_job(genserve_url, auth, plain["id"])
    assert [res["revised_prompt"] for res in plain["results"]] == ["a red fox"]
    assert by_model(genserve_url, tenant)["tiny-chat"] == chat


def test_sync_enhance_bills_the_chat_model(genserve_url: str) -> None:
    tenant, auth = new_tenant(genserve_url)
    r = httpx.post(genserve_url + "/v1/images/generations", headers=auth, timeout=120,
                   json={"prompt": "a red fox", "enhance": True, "seed": 3, "model": "sdxl-tiny"})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["revised_prompt"] != "a red fox"
    usage = by_model(genserve_url, tenant)
    assert usage["tiny-chat"]["completion_tokens"] > 0 and usage["sdxl-tiny"]["images"] == 1


@pytest.fixture
async def images_only_app(genserve_url: str, tmp_path):
    """The real app in-process on the session cluster's model replicas, with a plan that has the
    image models but not the chat model."""
    from ray import serve

    from serve_app.app import create_app
    from serve_app.config import load_app_config
    from serve_app.ingress import build_services

    doc = local_config_doc(free_port(), tmp_path)
    args = doc["applications"][0]["args"]
    args["tenancy"].update(plans=[{"name": "images", "allowed_models": ["sdxl-tiny", "wuerstchen-tiny"]}],
                           default_plan="images", local_tenant={"enabled": False})
    cfg = load_app_config(args)
    diffusion = {m.name: serve.get_deployment_handle(m.deployment_name, app_name="genserve")
                 for m in cfg.diffusion_models}
    llm = {m.name: serve.get_deployment_handle(m.deployment_name, app_name="genserve") for m in cfg.llm_models}
    services = build_services(cfg, diffusion, llm)
    tenancy = services.tenancy
    tenancy.create_tenant("painter", "images")
    auth = {"Authorization": f"Bearer {tenancy.create_key('painter').key}"}
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://genserve", timeout=60) as client:
        yield client, auth
    tenancy.close()


async def test_plan_without_the_chat_model_gets_403_and_nothing_is_stored(images_only_app) -> None:
    client, auth = images_only_app
    for path in ("/v1/jobs", "/v1/images/generations"):
        for body in ({"prompt": "a red fox", "enhance": True}, {"prompt": "a red fox --enhance"}):
            r = await client.post(path, headers=auth, json=body)
            assert r.status_code == 403, (path, body, r.text)
            err = r.json()["error"]
            assert err["code"] == "model_not_allowed" and "tiny-chat" in err["message"], err
    assert (await client.get("/v1/jobs", headers=auth)).json()["data"] == []
    assert (await client.get("/v1/usage", headers=auth)).json()["month"]["requests"] == 0
    # The same plan may still draw without enhance.
    r = await client.post("/v1/images/generations", headers=auth, json={"prompt": "a red fox", "seed": 1})
    assert r.status_code == 200, r.text
