"""LLM LoRA adapters end to end over real HTTP with the official openai client: the session's app
(configs/local.yaml, tiny-chat with `lora.enabled`), adapters uploaded to the registry by two
tenants, requests as `model: "<base>:<adapter>"` or the adapter's own name. Greedy decoding, so
answers are exact."""

from __future__ import annotations

import asyncio
import io
import zipfile
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ADMIN_TOKEN

from deployments.llm.tiny import build_tiny_llm_adapters

pytest.importorskip("peft")

BASE = "tiny-chat"
MESSAGES = [{"role": "user", "content": "a red castle at night"}]


def _zip(adapter_dir: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            zf.write(adapter_dir / name, name)
    return buf.getvalue()


def _tenant(url: str, name: str) -> str:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    r = httpx.post(url + "/admin/tenants", headers=admin, json={"name": name, "plan": "pro"})
    assert r.status_code in (201, 409), r.text
    return httpx.post(f"{url}/admin/tenants/{name}/keys", headers=admin, json={}).json()["key"]


def _upload(url: str, key: str, name: str, adapter_dir: Path) -> dict:
    r = httpx.post(url + "/v1/adapters", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                   data={"name": name, "base_model": BASE}, files={"file": ("a.zip", _zip(adapter_dir))})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture(scope="module")
def tenants(genserve_url: str, tiny_models_dir: Path) -> dict[str, tuple[str, str]]:
    dirs = build_tiny_llm_adapters(tiny_models_dir / "llm-tiny-lora", tiny_models_dir / "llm-tiny")
    keys = {t: _tenant(genserve_url, f"lora-{t}-co") for t in ("a", "b")}
    # The same name in both tenants, different weights; b also holds one a must not see.
    _upload(genserve_url, keys["a"], "support-bot", dirs["tiny-a"])
    _upload(genserve_url, keys["b"], "support-bot", dirs["tiny-b"])
    _upload(genserve_url, keys["b"], "sales-bot", dirs["tiny-c"])
    return {t: (genserve_url, k) for t, k in keys.items()}


def clients(tenants: dict[str, tuple[str, str]]) -> dict[str, openai.AsyncOpenAI]:
    """Per test: an async client belongs to the event loop it first ran on."""
    return {t: openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
            for t, (url, key) in tenants.items()}


async def ask(client: openai.AsyncOpenAI, model: str, stream: bool = False) -> str:
    kw = dict(model=model, messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    if not stream:
        r = await client.chat.completions.create(**kw)
        assert r.model == model  # answered under the name asked for
        return r.choices[0].message.content or ""
    parts = []
    async for chunk in await client.chat.completions.create(stream=True, **kw):
        parts.extend(c.delta.content or "" for c in chunk.choices)
    return "".join(parts)


async def llm_stats() -> dict:
    from ray import serve

    handle = serve.get_deployment_handle(f"LLM-{BASE}", app_name="genserve")
    return (await handle.stats.remote())["adapters"]


async def test_adapter_requests_get_their_own_weights(tenants):
    a, b = clients(tenants).values()
    base = await ask(a, BASE)
    a_bot = await ask(a, f"{BASE}:support-bot")
    assert a_bot != base
    assert await ask(a, "support-bot") == a_bot  # the adapter's own name, as /v1/models lists it
    b_bot = await ask(b, f"{BASE}:support-bot")  # b's adapter of the same name: b's weights
    assert b_bot not in (a_bot, base)
    assert await ask(b, BASE) == base  # the base is unchanged by adapters loaded beside it
    # Concurrent, streamed and not, both tenants and the base: each gets its solo answer.
    got = await asyncio.gather(ask(a, "support-bot", stream=True), ask(b, "support-bot"), ask(a, BASE, stream=True),
                               ask(b, "sales-bot", stream=True), ask(a, f"{BASE}:support-bot"))
    sales = await ask(b, "sales-bot")
    assert got == [a_bot, b_bot, base, sales, a_bot]
    assert len({base, a_bot, b_bot, sales}) == 4


async def test_models_lists_only_the_tenants_own_adapters_with_their_parent(tenants):
    a, b = clients(tenants).values()
    listed = {m.id: m for m in (await a.models.list()).data}
    assert BASE in listed
    bot = listed["support-bot"].model_dump()
    assert bot["parent"] == BASE and bot["root"].startswith("ad_") and bot["capability"] == "chat"
    assert "sales-bot" not in listed  # b's private adapter
    b_ids = {m.id for m in (await b.models.list()).data}
    assert {"support-bot", "sales-bot"} <= b_ids


async def test_unknown_or_foreign_adapters_are_404_before_any_gpu_work(tenants):
    a = clients(tenants)["a"]
    loads = (await llm_stats())["loads"]
    for model in ("sales-bot", f"{BASE}:sales-bot", f"{BASE}:nope", "nope-model:support-bot", "no-such-model"):
        with pytest.raises(openai.NotFoundError) as err:
            await ask(a, model)
        body = err.value.body
        assert body["param"] == "model" and body["code"] in ("adapter_not_found", "model_not_found"), body
        assert "sales" not in str(body) or model.endswith("sales-bot")  # nothing about b's adapters leaks
    with pytest.raises(openai.BadRequestError) as bad:  # an image model is no base for chat adapters
        await ask(a, "sdxl-tiny:support-bot")
    assert bad.value.body["param"] == "model"
    assert (await llm_stats())["loads"] == loads  # no replica loaded anything for those
