"""API keys and the admin API over HTTP: hashing, 401/403 cases, both headers, isolation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from servers import db_url, make_tenancy, postgres_server, tenancy_app  # noqa: F401  (fixtures)

from serve_app.tenancy import ensure_local_tenant

ADMIN = {"Authorization": "Bearer admin-secret"}
PLANS = [
    {"name": "basic", "allowed_models": ["small"], "monthly_budget_usd": None},
    {"name": "gold", "allowed_models": "*", "priority": 5, "monthly_budget_usd": None},
]


@pytest.fixture
def setup(db_url: str, tmp_path: Path):  # noqa: F811
    tenancy = make_tenancy(db_url, tmp_path, plans=PLANS, auth_cache_s=0)
    with TestClient(tenancy_app(tenancy)) as client:
        yield tenancy, client
    tenancy.close()


def _chat(client: TestClient, headers: dict, model: str = "small"):  # type: ignore[no-untyped-def]
    return client.post("/v1/chat/completions", headers=headers,
                       json={"model": model, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2})


def test_db_never_holds_the_plaintext_key(tmp_path: Path) -> None:
    tenancy = make_tenancy(f"sqlite:///{tmp_path / 'app.db'}", tmp_path, plans=PLANS)
    tenancy.create_tenant("acme", "basic")
    keys = [tenancy.create_key("acme").key for _ in range(3)]
    tenancy.authenticate_sync(keys[0])
    tenancy.close()
    blob = b"".join(p.read_bytes() for p in tmp_path.glob("app.db*"))
    for key in keys:
        assert key.encode() not in blob
        assert key[12:].encode() not in blob  # not even the secret part
        assert key[:12].encode() in blob  # the visible prefix is stored (the grep itself works)
    from serve_app.tenancy.keys import hash_key

    assert hash_key(keys[0], "pepper").encode() in blob


def test_bearer_and_x_api_key_both_work(setup) -> None:  # type: ignore[no-untyped-def]
    tenancy, client = setup
    tenancy.create_tenant("acme", "basic")
    key = tenancy.create_key("acme").key
    for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}, {"authorization": f"bearer {key}"}):
        r = _chat(client, headers)
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-limit-requests"] == "60"


@pytest.mark.parametrize("case", ["missing", "garbage", "unknown", "revoked", "expired", "wrong-secret"])
def test_bad_keys_get_401_without_echoing_the_key(setup, case: str) -> None:  # type: ignore[no-untyped-def]
    tenancy, client = setup
    tenancy.create_tenant("acme", "basic")
    good = tenancy.create_key("acme").key
    key = {
        "missing": None,
        "garbage": "not a key",
        "unknown": "gsk_" + "A" * 43,
        "revoked": good,
        "expired": tenancy.create_key("acme", expires_at=datetime.now(UTC) - timedelta(seconds=1)).key,
        "wrong-secret": good[:12] + "B" * (len(good) - 12),
    }[case]
    if case == "revoked":
        tenancy.revoke_key(good[:12])
    r = _chat(client, {} if key is None else {"Authorization": f"Bearer {key}"})
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    err = r.json()["error"]
    if key is not None:
        assert key not in r.text and key[4:] not in r.text
    if case in ("unknown", "revoked", "wrong-secret", "garbage"):
        assert err["message"] == "Incorrect API key provided." and err["code"] == "invalid_api_key"
    if case == "expired":
        assert err["code"] == "api_key_expired"


def test_model_outside_plan_is_403(setup) -> None:  # type: ignore[no-untyped-def]
    tenancy, client = setup
    tenancy.create_tenant("acme", "basic")
    key = tenancy.create_key("acme").key
    r = _chat(client, {"X-API-Key": key}, model="large")
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "model_not_allowed" and r.json()["error"]["param"] == "model"
    tenancy.set_plan("acme", "gold")
    assert _chat(client, {"X-API-Key": key}, model="large").status_code == 200


def test_admin_token_required(setup) -> None:  # type: ignore[no-untyped-def]
    _, client = setup
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "admin-secret"},
                    {"Authorization": "Basic admin-secret"}):
        r = client.get("/admin/tenants", headers=headers)
        assert r.status_code == 401, headers
        assert "admin-secret" not in r.text
    assert client.get("/admin/tenants", headers=ADMIN).status_code == 200


def test_admin_disabled_without_token(db_url: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    monkeypatch.delenv("GENSERVE_ADMIN_TOKEN", raising=False)
    tenancy = make_tenancy(db_url, tmp_path, admin_token=None)
    with TestClient(tenancy_app(tenancy)) as client:
        r = client.get("/admin/tenants", headers={"Authorization": "Bearer "})
        assert r.status_code == 401 and r.json()["error"]["code"] == "admin_disabled"
    tenancy.close()


def test_admin_api_round_trip(setup) -> None:  # type: ignore[no-untyped-def]
    _, client = setup
    r = client.post("/admin/tenants", headers=ADMIN, json={"name": "acme", "plan": "basic"})
    assert r.status_code == 201 and r.json()["plan"] == "basic"
    assert client.post("/admin/tenants", headers=ADMIN, json={"name": "acme"}).status_code == 409
    bad = client.post("/admin/tenants", headers=ADMIN, json={"name": "x", "plan": "platinum"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "plan"
    assert client.post("/admin/tenants", headers=ADMIN, json={"name": "Bad Name!"}).status_code == 400
    assert client.patch("/admin/tenants/acme", headers=ADMIN, json={"plan": "gold"}).json()["plan"] == "gold"
    assert client.patch("/admin/tenants/nope", headers=ADMIN, json={"plan": "gold"}).status_code == 404
    created = client.post("/admin/tenants/acme/keys", headers=ADMIN, json={"label": "ci", "expires_in_days": 1})
    assert created.status_code == 201
    key, prefix = created.json()["key"], created.json()["prefix"]
    assert key.startswith(prefix) and created.json()["expires_at"] is not None
    listed = client.get("/admin/tenants/acme/keys", headers=ADMIN).json()["data"]
    assert [k["prefix"] for k in listed] == [prefix] and all("key" not in k for k in listed)
    assert _chat(client, {"Authorization": f"Bearer {key}"}, model="large").status_code == 200
    assert client.delete(f"/admin/keys/{prefix}", headers=ADMIN).json()["revoked_at"] is not None
    assert _chat(client, {"Authorization": f"Bearer {key}"}).status_code == 401
    assert client.delete("/admin/keys/gsk_nothere", headers=ADMIN).status_code == 404
    usage = client.get("/admin/tenants/acme/usage", headers=ADMIN).json()
    assert usage["totals"]["requests"] == 1 and usage["totals"]["completion_tokens"] == 2
    assert [t["name"] for t in client.get("/admin/tenants", headers=ADMIN).json()["data"]] == ["acme"]


def test_tenant_isolation(setup) -> None:  # type: ignore[no-untyped-def]
    tenancy, client = setup
    for name in ("alice", "bob"):
        tenancy.create_tenant(name, "gold")
    ka, kb = tenancy.create_key("alice").key, tenancy.create_key("bob").key
    for _ in range(3):
        assert _chat(client, {"X-API-Key": ka}).status_code == 200
    mine = client.get("/v1/usage", headers={"X-API-Key": ka}).json()
    assert mine["tenant"] == "alice" and mine["today"]["requests"] == 3
    theirs = client.get("/v1/usage", headers={"X-API-Key": kb}).json()
    assert theirs["tenant"] == "bob" and theirs["today"]["requests"] == 0
    for other in ("alice", "nobody"):
        r = client.get("/v1/usage", headers={"X-API-Key": kb}, params={"tenant": other})
        assert r.status_code == 404 and r.json()["error"]["message"] == f"No tenant named {other!r}."
    assert client.get("/admin/tenants/alice/usage", headers={"Authorization": f"Bearer {kb}"}).status_code == 401
    assert client.get("/v1/usage").status_code == 401


def test_ensure_local_tenant_once(db_url: str, tmp_path: Path) -> None:  # noqa: F811
    tenancy = make_tenancy(db_url, tmp_path, plans=PLANS)
    key_file = tmp_path / "keys" / "local_api_key"
    key = ensure_local_tenant(tenancy, key_file)
    assert key is not None and key_file.read_text().strip() == key
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert ensure_local_tenant(tenancy, key_file) is None
    ctx = tenancy.authenticate_sync(key)
    assert ctx.tenant == "local" and ctx.plan.name == "gold"  # the top plan
    tenancy.revoke_key(key[:12])
    again = ensure_local_tenant(tenancy, key_file)  # no usable key left: a new one
    assert again is not None and again != key and key_file.read_text().strip() == again
    tenancy.close()


def test_hostile_input_is_bound_not_executed_and_keys_stay_out_of_logs(setup, caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    caplog.set_level(logging.DEBUG)
    tenancy, client = setup
    tenancy.create_tenant("acme", "basic")
    key = tenancy.create_key("acme").key
    for prefix in ("' OR '1'='1", "gsk_%", "%", "x'; DROP TABLE api_keys; --"):
        assert client.delete(f"/admin/keys/{prefix}", headers=ADMIN).status_code == 404
    for name in ("acme' OR '1'='1", "%"):
        assert client.get(f"/admin/tenants/{name}/usage", headers=ADMIN).status_code == 404
    for bogus in ("gsk_' OR '1'='1", "gsk_%%%%%%%%" + "A" * 35, key[:12] + "%" * 35):
        assert _chat(client, {"X-API-Key": bogus}).status_code == 401
    assert _chat(client, {"X-API-Key": key}).status_code == 200  # the key and its table survived
    assert [k.revoked_at for k in tenancy.list_keys("acme")] == [None]
    assert key not in caplog.text and key[12:] not in caplog.text


@pytest.mark.asyncio
async def test_a_stale_cached_key_is_answered_at_once_then_rechecked(tmp_path: Path) -> None:
    """Past auth_cache_s the cached key still answers (no database wait), and the background
    re-check sees a revocation made by another replica: the next request is refused."""
    import asyncio

    from serve_app.errors import APIError

    url = f"sqlite:///{tmp_path / 'app.db'}"
    replica = make_tenancy(url, tmp_path, plans=PLANS, auth_cache_s=0.05, auth_stale_s=30)
    other = make_tenancy(url, tmp_path, plans=PLANS)
    try:
        replica.create_tenant("acme", "basic")
        created = replica.create_key("acme")
        assert (await replica.authenticate(created.key)).tenant == "acme"  # looked up, cached
        other.revoke_key(created.prefix)  # elsewhere: this replica's cache does not know
        await asyncio.sleep(0.1)  # past auth_cache_s
        assert (await replica.authenticate(created.key)).tenant == "acme"  # stale, answered at once
        for _ in range(100):  # the background re-check drops the entry
            if not replica._refreshing:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(APIError) as e:
            await replica.authenticate(created.key)
        assert e.value.status == 401
    finally:
        replica.close()
        other.close()
