"""Chat and completions end to end: the official `openai` client against the real app (ingress →
LLM deployment, configs/local.yaml) on the shared local Ray cluster."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.ray


def _llm_config() -> dict:
    doc = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    models = doc["applications"][0]["args"].get("llm_models") or []
    if not models:
        pytest.skip("configs/local.yaml has no llm_models")
    return models[0]


@pytest.fixture(scope="module")
def llm_model() -> str:
    return _llm_config()["name"]


@pytest.fixture(scope="module")
def client(genserve_url: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=genserve_url + "/v1", api_key=api_key, max_retries=0)


def test_chat_streamed_and_not(client: openai.OpenAI, llm_model: str) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a lighthouse at dawn"}]
    full = client.chat.completions.create(model=llm_model, messages=msgs, max_tokens=12, temperature=0)
    assert full.object == "chat.completion" and full.model == llm_model
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.choices[0].finish_reason in ("length", "stop")
    stream = client.chat.completions.create(model=llm_model, messages=msgs, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_n_seed_and_alias(client: openai.OpenAI, llm_model: str) -> None:
    alias = (_llm_config().get("aliases") or [llm_model])[0]
    a = client.completions.create(model=alias, prompt="hello", max_tokens=6, n=2, seed=11, user="u1")
    b = client.completions.create(model=llm_model, prompt="hello", max_tokens=6, n=2, seed=11)
    assert a.model == llm_model and [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    streamed = list(client.completions.create(model=llm_model, prompt="hello", max_tokens=6, stream=True))
    assert streamed[-1].choices[0].finish_reason in ("length", "stop")


def test_errors_through_the_client(client: openai.OpenAI, llm_model: str, genserve_url: str, auth: dict) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=llm_model, messages=[])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=llm_model, messages=[{"role": "user", "content": "x"}],
                                       temperature=-1)
    ctx = _llm_config().get("max_model_len", 2048)
    r = httpx.post(genserve_url + "/v1/completions", timeout=60, headers=auth,
                   json={"model": llm_model, "prompt": "castle " * (ctx + 10), "stream": True})
    assert r.status_code == 413 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(genserve_url + "/v1/chat/completions", timeout=60, headers=auth,
                   json={"model": llm_model, "messages": [{"role": "oracle", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"


def test_client_disconnect_aborts_in_the_engine(genserve_url: str, llm_model: str, auth: dict) -> None:
    from ray import serve

    handle = serve.get_deployment_handle(f"LLM-{llm_model}", app_name="genserve")
    stats = handle.stats.remote().result()
    if stats["engine"] == "transformers":  # by default its model loop runs in a child of the replica
        assert stats["scheduler"] == "continuous" and stats["engine_process"] is True
    ctx = _llm_config().get("max_model_len", 2048)
    # ignore_eos: a random model may sample EOS within a few tokens and end on its own.
    body = {"model": llm_model, "messages": [{"role": "user", "content": "go on"}], "stream": True,
            "max_tokens": ctx - 64, "ignore_eos": True}
    with httpx.stream("POST", genserve_url + "/v1/chat/completions", json=body, timeout=60, headers=auth) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        # The role event leaves on the replica's `Started`, a moment before the engine has the sequence.
        deadline = time.monotonic() + 10
        while handle.stats.remote().result()["running"] < 1:
            assert time.monotonic() < deadline, "the engine never started the sequence"
            time.sleep(0.02)
    deadline = time.monotonic() + 20
    while handle.stats.remote().result()["running"] > 0:
        assert time.monotonic() < deadline, "generation kept running after the client left"
        time.sleep(0.2)


def test_a_refused_stream_gets_429_is_not_billed_and_stops_in_the_engine(genserve_url: str, llm_model: str) -> None:
    """Admission overlaps the stream's start (tenancy/overlap.py): a refusal still answers 429
    with the OpenAI error body, records nothing, and leaves no generation running."""
    import uuid

    from conftest import ADMIN_TOKEN
    from ray import serve

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    name = f"overlap-{uuid.uuid4().hex[:6]}"
    assert httpx.post(genserve_url + "/admin/tenants", headers=admin, json={"name": name, "plan": "free"}).is_success
    key = {"Authorization": "Bearer " + httpx.post(f"{genserve_url}/admin/tenants/{name}/keys", headers=admin,
                                                   json={}).json()["key"]}
    if time.time() % 60 > 45:  # the free plan's 20 requests per fixed minute must not straddle a window
        time.sleep(61 - time.time() % 60)
    short = {"model": llm_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": True}
    for _ in range(20):
        assert httpx.post(genserve_url + "/v1/chat/completions", json=short, headers=key, timeout=60).status_code == 200
    long = {**short, "max_tokens": _llm_config().get("max_model_len", 2048) - 64, "ignore_eos": True}
    for _ in range(2):  # the first overlaps its admission, the second (refused just now) does not
        r = httpx.post(genserve_url + "/v1/chat/completions", json=long, headers=key, timeout=60)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and "Retry-After" in r.headers
    usage = httpx.get(genserve_url + "/v1/usage", headers=key).json()["today"]
    assert usage["requests"] == 20 and usage["completion_tokens"] == 20
    handle = serve.get_deployment_handle(f"LLM-{llm_model}", app_name="genserve")
    deadline = time.monotonic() + 20
    while handle.stats.remote().result()["running"] > 0:
        assert time.monotonic() < deadline, "a refused request kept generating"
        time.sleep(0.1)


def test_streamed_and_plain_usage_land_in_the_ledger(client: openai.OpenAI, llm_model: str, genserve_url: str,
                                                      auth: dict) -> None:
    """The tenant's recorded tokens grow by exactly what the responses' own `usage` says."""
    def tokens() -> tuple[int, int]:
        today = httpx.get(genserve_url + "/v1/usage", headers=auth).json()["today"]
        return today["prompt_tokens"], today["completion_tokens"]

    msgs = [{"role": "user", "content": "count these tokens"}]
    before = tokens()
    plain = client.chat.completions.create(model=llm_model, messages=msgs, max_tokens=9, temperature=0)
    stream = client.chat.completions.create(model=llm_model, messages=msgs, max_tokens=9, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    streamed_usage = [c.usage for c in stream if c.usage is not None][-1]
    after = tokens()
    assert after[0] - before[0] == plain.usage.prompt_tokens + streamed_usage.prompt_tokens
    assert after[1] - before[1] == plain.usage.completion_tokens + streamed_usage.completion_tokens


def test_enhance_chains_llm_then_diffusion(genserve_url: str, auth: dict) -> None:
    """ingress → LLM (prompt expansion) → diffusion; the random model's prose is gibberish, so this
    checks the plumbing: the drawn prompt is the LLM's text, and the image is generated."""
    r = httpx.post(genserve_url + "/v1/images/generations", headers=auth, timeout=120,
                   json={"prompt": "a red fox --enhance --seed 3", "model": "sdxl-tiny"})
    assert r.status_code == 200, r.text
    revised = r.json()["data"][0]["revised_prompt"]
    assert revised and revised != "a red fox"
    again = httpx.post(genserve_url + "/v1/images/generations", headers=auth, timeout=120,
                       json={"prompt": "a red fox", "enhance": False, "seed": 3, "model": "sdxl-tiny"})
    assert again.json()["data"][0]["revised_prompt"] == "a red fox"


def test_streamed_chat_says_where_its_time_went(genserve_url: str, api_key: str, llm_model: str) -> None:
    """`Server-Timing` on the response: the ingress's phases before the first byte, and its whole."""
    body = {"model": llm_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", genserve_url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {api_key}"}) as resp:
        assert resp.status_code == 200
        timing = resp.headers["server-timing"]
        resp.read()
    phases = {}
    for part in timing.split(","):
        name, _, dur = part.strip().partition(";dur=")
        phases[name] = float(dur)
    assert set(phases) == {"auth", "admit", "llm", "app"}, timing
    assert all(ms >= 0 for ms in phases.values())
    # Admission overlaps the stream's start (tenancy.admission_overlap, on here): `llm` runs from
    # the replica call to its `Started` and includes waiting for the admission, which began inside it.
    assert phases["admit"] <= phases["llm"]
    assert phases["auth"] + phases["llm"] <= phases["app"]


def test_chat_and_completions_record_gpu_seconds_in_the_ledger(genserve_url: str, llm_model: str,
                                                                app_work_dir: Path) -> None:
    """The LLM replica's share-clock GPU-seconds reach the usage ledger, streamed or not (a tenant
    of its own, so the rows are this test's)."""
    import uuid

    from conftest import ADMIN_TOKEN
    from sqlalchemy import create_engine, select

    from serve_app.tenancy.models import Tenant, UsageEvent

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    name = f"gpu-{uuid.uuid4().hex[:6]}"
    assert httpx.post(genserve_url + "/admin/tenants", headers=admin, json={"name": name, "plan": "pro"}).is_success
    key = {"Authorization": "Bearer " + httpx.post(f"{genserve_url}/admin/tenants/{name}/keys", headers=admin,
                                                   json={}).json()["key"]}
    msgs = [{"role": "user", "content": "how long did this take"}]
    calls = [("/v1/chat/completions", {"messages": msgs}), ("/v1/chat/completions", {"messages": msgs, "stream": True}),
             ("/v1/completions", {"prompt": "tick tock"})]
    for path, body in calls:
        r = httpx.post(genserve_url + path, headers=key, timeout=60,
                       json={"model": llm_model, "max_tokens": 6, "ignore_eos": True, **body})
        assert r.status_code == 200, r.text
    engine = create_engine(f"sqlite:///{app_work_dir / 'genserve.db'}")
    deadline = time.monotonic() + 15
    while True:  # a streamed response settles right after its last byte
        with engine.connect() as conn:
            rows = conn.execute(select(UsageEvent.route, UsageEvent.prompt_tokens, UsageEvent.completion_tokens,
                                       UsageEvent.gpu_seconds)
                                .join(Tenant, Tenant.id == UsageEvent.tenant_id).where(Tenant.name == name)).all()
        if len(rows) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    engine.dispose()
    assert sorted(r.route for r in rows) == ["chat", "chat", "completions"]
    for row in rows:
        assert row.completion_tokens == 6 and 0 < row.gpu_seconds < 60, row
    usage = httpx.get(genserve_url + "/v1/usage", headers=key).json()["today"]
    gpu_s, tokens = sum(r.gpu_seconds for r in rows), sum(r.prompt_tokens + r.completion_tokens for r in rows)
    assert usage["gpu_seconds"] == pytest.approx(gpu_s)
    # configs/local.yaml: $1 per (replica-)hour for every model.
    assert usage["gpu_cost_usd"] == pytest.approx(gpu_s / 3600)
    assert usage["gpu_cost_per_1k_tokens_usd"] == pytest.approx(gpu_s / 3600 / tokens * 1000)
    assert usage["price_per_1k_tokens_usd"] > 0 and usage["gpu_cost_per_image_usd"] is None


def test_a_stream_cut_short_records_the_gpu_seconds_it_was_sent(genserve_url: str, llm_model: str,
                                                                 app_work_dir: Path) -> None:
    """The replica reports a request's GPU-seconds cumulatively on each delta; a client that leaves
    mid-stream is charged the figure of the last chunk it was sent (> 0), as `disconnected`."""
    import uuid

    from conftest import ADMIN_TOKEN
    from sqlalchemy import create_engine, select

    from serve_app.tenancy.models import Tenant, UsageEvent

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    name = f"gpucut-{uuid.uuid4().hex[:6]}"
    assert httpx.post(genserve_url + "/admin/tenants", headers=admin, json={"name": name, "plan": "pro"}).is_success
    key = {"Authorization": "Bearer " + httpx.post(f"{genserve_url}/admin/tenants/{name}/keys", headers=admin,
                                                   json={}).json()["key"]}
    body = {"model": llm_model, "messages": [{"role": "user", "content": "go on"}], "stream": True,
            "max_tokens": _llm_config().get("max_model_len", 2048) - 64, "ignore_eos": True}
    with httpx.stream("POST", genserve_url + "/v1/chat/completions", json=body, timeout=60, headers=key) as resp:
        assert resp.status_code == 200
        content = 0
        for line in resp.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                content += 1
                if content == 3:
                    break
    engine = create_engine(f"sqlite:///{app_work_dir / 'genserve.db'}")
    deadline, rows = time.monotonic() + 20, []
    while not rows and time.monotonic() < deadline:
        time.sleep(0.2)
        with engine.connect() as conn:
            rows = conn.execute(select(UsageEvent.status, UsageEvent.completion_tokens, UsageEvent.gpu_seconds)
                                .join(Tenant, Tenant.id == UsageEvent.tenant_id).where(Tenant.name == name)).all()
    engine.dispose()
    assert len(rows) == 1, rows
    status, completion, gpu = rows[0]
    assert status == "disconnected" and 0 < completion < body["max_tokens"]
    assert 0 < gpu < 60
