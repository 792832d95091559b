"""Bad input never gives a 500 (issue 17): text that can't be stored or encoded, stored rows that
hold it, out-of-range paging, empty prompts, and failures of ours that must not cost rate.

The app is the real one (`create_app`) with real tenancy, library, storage and jobs on SQLite or
Postgres; no model deployments run (they are not needed: every case is decided before them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from servers import db_url, make_tenancy, postgres_server, redis_server  # noqa: F401  (fixtures)
from sqlalchemy import insert, select

from serve_app.app import create_app
from serve_app.config import AppConfig, DiffusionModelConfig
from serve_app.errors import APIError, bad_request, unavailable
from serve_app.ingress import assemble_services
from serve_app.jobs.models import Job
from serve_app.library import Library
from serve_app.library.models import Generation, PromptTemplateRow
from serve_app.storage import LocalResultStore
from serve_app.tenancy import Tenancy
from serve_app.tenancy.models import RateCounter

ADMIN = {"Authorization": "Bearer admin-secret"}
PLANS = [{"name": "tight", "allowed_models": "*", "requests_per_minute": 3, "monthly_budget_usd": None}]
BAD = "@BAD@"  # where a case puts its bad text, escaped, into the raw JSON body


@dataclass
class Api:
    client: TestClient
    auth: dict[str, str]
    tenancy: Tenancy
    tenant_id: int


def make_api(url: str, tmp_path: Path) -> Iterator[Api]:
    tenancy = make_tenancy(url, tmp_path, plans=PLANS, auth_cache_s=0)
    tenancy.create_tenant("acme")
    key = tenancy.create_key("acme").key
    auth = {"Authorization": f"Bearer {key}"}
    cfg = AppConfig(diffusion_models=[DiffusionModelConfig(name="tiny", family="sdxl", model="none")])
    store = LocalResultStore(tmp_path / "results", signing_key=b"s" * 32)
    # No diffusion/LLM handles: a request that gets past validation ends in the model's 503.
    services = assemble_services(cfg, diffusion={}, llm={}, tenancy=tenancy, storage=store,
                                 library=Library(tenancy.engine))
    with TestClient(create_app(services)) as client:
        yield Api(client, auth, tenancy, tenancy.authenticate_sync(key).tenant_id)
    tenancy.close()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(f"sqlite:///{tmp_path / 'app.db'}", tmp_path)


@pytest.fixture
def api_any_db(db_url: str, tmp_path: Path) -> Iterator[Api]:  # noqa: F811
    yield from make_api(db_url, tmp_path)


def err(r: Any) -> tuple[int, str | None, str | None]:
    body = r.json()["error"]
    return r.status_code, body["param"], body["code"]


def raw_body(doc: Any, escape: str) -> bytes:
    """JSON with `escape` (e.g. `\\ud800`) where BAD is: Python's json can't write a lone
    surrogate into UTF-8, so it goes in as the escape a client would send."""
    return json.dumps(doc).replace(BAD, escape).encode()


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
IMAGE = {"prompt": "a cat"}
# route, body with BAD somewhere, the param the 400 must name
TEXT_CASES = [
    ("/v1/images/generations", {"prompt": BAD}, "prompt"),
    ("/v1/images/generations", {**IMAGE, "negative_prompt": BAD}, "negative_prompt"),
    ("/v1/images/generations", {**IMAGE, "variables": {"subject": BAD}}, "variables.subject"),
    ("/v1/images/generations", {**IMAGE, "variables": {BAD: "x"}}, "variables"),
    ("/v1/images/generations", {**IMAGE, "user": BAD}, "user"),
    ("/v1/images/generations", {**IMAGE, "size": BAD}, "size"),
    ("/v1/jobs", {**IMAGE, "variables": {"subject": BAD}}, "variables.subject"),
    ("/v1/jobs", {**IMAGE, "webhook_url": BAD}, "webhook_url"),
    ("/v1/prompts/render", {**IMAGE, "negative_prompt": BAD}, "negative_prompt"),
    ("/v1/prompts/render", {**IMAGE, "variables": {"subject": BAD}}, "variables.subject"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": BAD}]}, "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "system", "content": "s"},
                                                   {"role": "user", "content": [{"type": "text", "text": BAD}]}]},
     "messages[1].content[0].text"),
    ("/v1/chat/completions", {**CHAT, "stop": ["ok", BAD]}, "stop[1]"),
    ("/v1/chat/completions", {**CHAT, "model": BAD}, "model"),
    ("/v1/completions", {"model": "m", "prompt": BAD}, "prompt"),
    ("/v1/completions", {"model": "m", "prompt": [BAD]}, "prompt[0]"),
    ("/v1/templates", {"name": "t", "template": BAD}, "template"),
    ("/v1/templates", {"name": "t", "template": "x", "tags": ["a", BAD]}, "tags[1]"),
    ("/admin/tenants", {"name": BAD}, "name"),
]


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "\\u0000"])
@pytest.mark.parametrize(("path", "doc", "param"), TEXT_CASES)
def test_unstorable_text_is_a_400_naming_the_field(api: Api, path: str, doc: dict, param: str,
                                                   escape: str) -> None:
    headers = {**(ADMIN if path.startswith("/admin") else api.auth), "Content-Type": "application/json"}
    r = api.client.post(path, content=raw_body(doc, escape), headers=headers)
    assert err(r) == (400, param, "invalid_text"), r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_lone_surrogate_job_is_refused_not_stored(api: Api) -> None:
    """The issue's case: the job was stored, then the tenant's job list answered 500 for good."""
    r = api.client.post("/v1/jobs", content=raw_body({**IMAGE, "variables": {"subject": BAD}}, "\\ud800"),
                        headers={**api.auth, "Content-Type": "application/json"})
    assert err(r) == (400, "variables.subject", "invalid_text")
    listed = api.client.get("/v1/jobs", headers=api.auth)
    assert listed.status_code == 200 and listed.json()["data"] == []
    # Raw CESU-8 bytes of a surrogate (which json.loads decodes with surrogatepass) count too.
    r = api.client.post("/v1/jobs", content=b'{"prompt": "a \xed\xa0\x80 cat"}',
                        headers={**api.auth, "Content-Type": "application/json"})
    assert err(r) == (400, "prompt", "invalid_text")


@pytest.mark.parametrize(("url", "param"), [
    ("/v1/jobs?status=%00", "status"),
    ("/v1/templates?q=a%00", "q"),
    ("/v1/generations?model=%00", "model"),
    ("/v1/jobs/job_%00", "job_id"),
    ("/v1/generations/gen_%00", "generation_id"),
])
def test_unstorable_text_in_query_and_path_is_a_400(api: Api, url: str, param: str) -> None:
    assert err(api.client.get(url, headers=api.auth)) == (400, param, "invalid_text")


def _bad_rows(api: Api) -> dict[str, str]:
    """Rows as an older version (without the edge check) could have stored them: JSON holding a
    lone surrogate, written straight into the database. Returns the ids."""
    now = datetime.now(UTC)
    spec = {"prompt": "a cat", "negative_prompt": "", "tasks": [{"seed": 1}], "params": {"subject": "\ud800"},
            "tenant": "acme"}
    with api.tenancy.engine.begin() as conn:
        conn.execute(insert(Job).values(
            id="job_bad", tenant_id=api.tenant_id, status="queued", model="tiny", spec=spec, progress=0.0,
            attempts=0, max_attempts=1, cancel_requested=False, created_at=now))
        # Not even a job's shape any more (no prompt, no tasks): left out of lists, never a 500.
        conn.execute(insert(Job).values(
            id="job_broken", tenant_id=api.tenant_id, status="failed", model="tiny", spec={"x": 1}, progress=0.0,
            attempts=1, max_attempts=1, cancel_requested=False, created_at=now))
        conn.execute(insert(Generation).values(
            id="gen_bad", tenant_id=api.tenant_id, prompt="a cat", negative_prompt="", model="tiny", seeds=[1],
            params={"subject": "\ud800"}, result_keys=[], result_urls=[], created_at=now))
        conn.execute(insert(PromptTemplateRow).values(
            tenant_id=api.tenant_id, name="bad", version=1, category="general", template="{subject}",
            defaults="", tags=["\ud800"], created_at=now))
    return {"job": "job_bad", "generation": "gen_bad", "template": "bad"}


def test_a_bad_stored_row_never_breaks_list_or_read(api_any_db: Api) -> None:
    api = api_any_db
    try:
        _bad_rows(api)
    except Exception as e:  # noqa: BLE001
        # Postgres refuses such JSON itself (`\ud800` is not valid JSON text there): nothing to repair.
        assert api.tenancy.engine.dialect.name == "postgresql", e
        pytest.skip(f"the database refuses unpaired surrogates: {type(e).__name__}")
    get = api.client.get
    jobs = get("/v1/jobs", headers=api.auth)
    assert jobs.status_code == 200, jobs.text
    assert [j["id"] for j in jobs.json()["data"]] == ["job_bad"]  # the broken one is left out
    assert jobs.json()["data"][0]["params"] == {"subject": "\ufffd"}  # repaired on read
    assert get("/v1/jobs?status=queued", headers=api.auth).status_code == 200
    assert get("/v1/jobs/job_bad", headers=api.auth).json()["params"] == {"subject": "\ufffd"}
    gens = get("/v1/generations", headers=api.auth)
    assert gens.status_code == 200 and gens.json()["data"][0]["params"] == {"subject": "\ufffd"}
    assert get("/v1/generations/gen_bad", headers=api.auth).status_code == 200
    templates = get("/v1/templates", headers=api.auth)
    assert templates.status_code == 200, templates.text
    assert [t["tags"] for t in templates.json()["data"] if t["name"] == "bad"] == [["\ufffd"]]
    assert get("/v1/templates/bad", headers=api.auth).status_code == 200
    cancelled = api.client.delete("/v1/jobs/job_bad", headers=api.auth)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


HUGE = "9223372036854775808"  # 2**63: overflowed SQLite's INTEGER (a 500 before)


@pytest.mark.parametrize(("url", "param"), [
    (f"/v1/generations?offset={HUGE}", "offset"),
    (f"/v1/templates?offset={HUGE}", "offset"),
    (f"/v1/generations?limit={HUGE}", "limit"),
    (f"/v1/templates?limit={HUGE}", "limit"),
    (f"/v1/jobs?limit={HUGE}", "limit"),
    ("/v1/generations?offset=-1", "offset"),
    ("/v1/templates?limit=0", "limit"),
    ("/v1/jobs?limit=0", "limit"),
    ("/v1/generations?offset=100001", "offset"),
])
def test_out_of_range_paging_is_a_422(api: Api, url: str, param: str) -> None:
    assert err(api.client.get(url, headers=api.auth)) == (422, param, "out_of_range")


def test_paging_at_the_bounds_still_works(api: Api) -> None:
    for url in ("/v1/generations?offset=100000&limit=200", "/v1/templates?offset=100000&limit=1",
                "/v1/jobs?limit=100"):
        assert api.client.get(url, headers=api.auth).status_code == 200, url
    assert err(api.client.get("/v1/jobs?limit=x", headers=api.auth))[:2] == (400, "limit")


def _requests_counted(api: Api) -> int:
    with api.tenancy.engine.connect() as conn:
        return int(sum(conn.execute(select(RateCounter.used).where(
            RateCounter.tenant_id == api.tenant_id, RateCounter.kind == "requests")).scalars()))


@pytest.mark.parametrize("prompt", ["", [""], []])
def test_empty_completion_prompt_is_a_400_and_costs_no_rate(api: Api, prompt: Any) -> None:
    for _ in range(4):  # more than the plan's 3 requests per minute: never a 429
        r = api.client.post("/v1/completions", json={"model": "m", "prompt": prompt}, headers=api.auth)
        assert err(r)[:2] == (400, "prompt"), r.text
    r = api.client.post("/v1/chat/completions", json={"model": "m", "messages": []}, headers=api.auth)
    assert err(r)[:2] == (400, "messages")
    assert _requests_counted(api) == 0


def test_a_failure_of_ours_after_admission_gives_the_request_back(api: Api) -> None:
    """No diffusion replica serves `tiny`: admitted, then our 503. With 3 requests per minute, a
    4th and 5th attempt must still reach the model (503 again), not be refused with 429."""
    for _ in range(5):
        r = api.client.post("/v1/images/generations", json={"prompt": "a cat", "size": "64x64", "steps": 2},
                            headers=api.auth)
        assert r.status_code == 503, r.text
    assert _requests_counted(api) == 0


@pytest.fixture(params=["sqlite", "redis"])
def limiter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tenancy]:
    """A Tenancy with 2 requests per window, counted in the database or in Redis."""
    extra: dict[str, Any] = {}
    if request.param == "redis":
        import redis

        extra["redis_url"] = request.getfixturevalue("redis_server").url
        redis.Redis.from_url(extra["redis_url"]).flushdb()
    plans = [{**PLANS[0], "requests_per_minute": 2}]
    tenancy = make_tenancy(f"sqlite:///{tmp_path / 'app.db'}", tmp_path, plans=plans, rate_window_s=3600, **extra)
    tenancy.create_tenant("acme")
    yield tenancy
    tenancy.close()


@pytest.mark.parametrize(("failure", "refunded"), [
    (unavailable("the model is at capacity"), True),  # ours: 503
    (RuntimeError("a bug of ours"), True),  # ours: would be a 500
    (bad_request("the client's own mistake"), False),  # theirs: still counts
])
def test_only_failures_of_ours_give_the_request_unit_back(limiter: Tenancy, failure: Exception,
                                                          refunded: bool) -> None:
    ctx = limiter.authenticate_sync(limiter.create_key("acme").key)

    async def attempt() -> None:
        adm = await limiter.admit(ctx, route="images", model="tiny")
        with pytest.raises(type(failure)):
            async with adm:
                raise failure

    for _ in range(2):
        anyio.run(attempt)
    # Two failures took the plan's 2 units unless they were given back.
    if refunded:
        limiter.admit_sync(ctx, route="images", model="tiny").settle_sync()
    else:
        with pytest.raises(APIError) as e:
            limiter.admit_sync(ctx, route="images", model="tiny")
        assert e.value.status == 429
