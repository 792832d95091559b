"""Rate and concurrency limits hold exactly across processes (replicas), in SQL and in Redis."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from servers import make_tenancy, postgres_server, redis_server, tenancy_app  # noqa: F401  (fixtures)

from serve_app.errors import APIError

WINDOW = 3600  # long windows, so a test never straddles two of them (see _not_near_boundary)


def _plan(**limits: object) -> list[dict]:
    base = {"name": "metered", "requests_per_minute": None, "tokens_per_minute": None, "images_per_minute": None,
            "max_concurrent_requests": None, "monthly_budget_usd": None}
    return [{**base, **limits}]


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> dict:
    """database_url (+ redis_url) for one limiter backend."""
    if request.param == "postgres":
        return {"database_url": request.getfixturevalue("postgres_server").create_database()}
    out: dict = {"database_url": f"sqlite:///{tmp_path / 'genserve.db'}"}
    if request.param == "redis":
        import redis

        url = request.getfixturevalue("redis_server").url
        redis.Redis.from_url(url).flushdb()
        out["redis_url"] = url
    return out


def _not_near_boundary(window: int = WINDOW, margin: float = 30.0) -> None:
    left = window - time.time() % window
    if left < margin:
        time.sleep(left + 0.5)


def _replica(cfg: dict, work_dir: str, key: str, attempts: int, barrier, results) -> None:  # type: ignore[no-untyped-def]
    """One 'ingress replica': its own process, engine and connections."""
    from serve_app.tenancy import Tenancy, TenancyConfig

    tenancy = Tenancy(TenancyConfig(**cfg), work_dir=Path(work_dir), migrate=False)
    ctx = tenancy.authenticate_sync(key)
    admitted = rejected = 0
    barrier.wait()
    for _ in range(attempts):
        try:
            adm = tenancy.admit_sync(ctx, route="chat", model="m")
        except APIError as e:
            assert e.status == 429 and e.code == "rate_limit_exceeded", e.message
            rejected += 1
        else:
            admitted += 1
            adm.settle_sync()
    tenancy.close()
    results.put((admitted, rejected))


def test_exactly_limit_admitted_across_processes(backend: dict, tmp_path: Path) -> None:
    limit, procs, attempts = 37, 4, 25
    cfg = {**backend, "plans": _plan(requests_per_minute=limit), "default_plan": "metered",
           "rate_window_s": WINDOW, "key_pepper": "p"}
    tenancy = make_tenancy(work_dir=tmp_path, db_url=cfg.pop("database_url"), **cfg)
    cfg["database_url"] = tenancy.config.database_url
    tenancy.create_tenant("acme")
    key = tenancy.create_key("acme").key
    _not_near_boundary()
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_replica, args=(cfg, str(tmp_path), key, attempts, barrier, results))
               for _ in range(procs)]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=240) for _ in workers]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    assert sum(a for a, _ in outcomes) == limit
    assert sum(r for _, r in outcomes) == procs * attempts - limit
    usage = tenancy.usage("acme")
    assert usage.totals.requests == limit  # each admitted request settled exactly once
    tenancy.close()


def test_all_or_nothing_images_and_token_settlement(backend: dict, tmp_path: Path) -> None:
    tenancy = make_tenancy(work_dir=tmp_path, plans=_plan(requests_per_minute=10, images_per_minute=5,
                                                          tokens_per_minute=1000),
                           db_url=backend["database_url"], redis_url=backend.get("redis_url"), rate_window_s=WINDOW)
    tenancy.create_tenant("acme")
    ctx = tenancy.authenticate_sync(tenancy.create_key("acme").key)
    _not_near_boundary()
    a = tenancy.admit_sync(ctx, route="images", model="m", images=3)
    assert a.headers()["x-ratelimit-remaining-images"] == "2"
    a.add(images=3)
    a.settle_sync()
    with pytest.raises(APIError) as err:
        tenancy.admit_sync(ctx, route="images", model="m", images=3)
    e = err.value
    assert e.status == 429 and e.headers["x-ratelimit-limit-images"] == "5"
    assert e.headers["x-ratelimit-remaining-images"] == "2" and int(e.headers["Retry-After"]) >= 1
    # The refused request took no request slot: this is the 2nd request counted, 8 remain.
    b = tenancy.admit_sync(ctx, route="images", model="m", images=2)
    assert b.headers()["x-ratelimit-remaining-requests"] == "8"
    b.settle_sync()  # it produced no image: the 2 held images go back
    c = tenancy.admit_sync(ctx, route="chat", model="m", est_tokens=600)
    assert c.headers()["x-ratelimit-remaining-tokens"] == "400"
    c.add(prompt_tokens=50, completion_tokens=50)
    c.settle_sync()  # 600 held, 100 used: 500 come back
    d = tenancy.admit_sync(ctx, route="chat", model="m", est_tokens=900)
    assert d.headers()["x-ratelimit-remaining-tokens"] == "0"
    d.settle_sync()
    assert tenancy.admit_sync(ctx, route="images", model="m", images=2).headers()[
        "x-ratelimit-remaining-images"] == "0"
    with pytest.raises(APIError) as too_big:
        tenancy.admit_sync(ctx, route="chat", model="m", est_tokens=5000)
    assert "too large" in too_big.value.message
    tenancy.close()


def test_concurrency_limit_is_exact_and_freed_in_finally(backend: dict, tmp_path: Path) -> None:
    tenancy = make_tenancy(work_dir=tmp_path, plans=_plan(max_concurrent_requests=3),
                           db_url=backend["database_url"], redis_url=backend.get("redis_url"))
    tenancy.create_tenant("acme")
    ctx = tenancy.authenticate_sync(tenancy.create_key("acme").key)
    held, refused, lock = [], [], threading.Lock()
    barrier = threading.Barrier(10)

    def attempt() -> None:
        barrier.wait()
        try:
            adm = tenancy.admit_sync(ctx, route="chat", model="m")
        except APIError as e:
            with lock:
                refused.append(e)
        else:
            with lock:
                held.append(adm)

    threads = [threading.Thread(target=attempt) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(held) == 3 and len(refused) == 7
    assert refused[0].status == 429 and refused[0].headers["Retry-After"] == "1"
    held.pop().settle_sync()
    assert held[0].settle_sync() is True and held[0].settle_sync() is False  # once only
    held.pop(0)
    third = tenancy.admit_sync(ctx, route="chat", model="m")
    fourth = tenancy.admit_sync(ctx, route="chat", model="m")
    with pytest.raises(APIError):
        tenancy.admit_sync(ctx, route="chat", model="m")
    for adm in (*held, third, fourth):
        adm.settle_sync()
    tenancy.close()


def test_slot_of_a_dead_replica_is_swept(tmp_path: Path, postgres_server) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    for url in (f"sqlite:///{tmp_path / 'a.db'}", postgres_server.create_database()):
        tenancy = make_tenancy(url, tmp_path, plans=_plan(max_concurrent_requests=1, monthly_budget_usd=1.0),
                               lease_ttl_s=60)
        tenancy.create_tenant("acme")
        ctx = tenancy.authenticate_sync(tenancy.create_key("acme").key)
        tenancy.admit_sync(ctx, route="images", model="m", images=50)  # never settled: its replica "died"
        with pytest.raises(APIError):
            tenancy.admit_sync(ctx, route="chat", model="m")
        tenancy.sweep(now=time.time() + 61)
        tenancy.admit_sync(ctx, route="images", model="m", images=50).settle_sync()
        tenancy.close()


def test_http_429_carries_openai_headers(tmp_path: Path) -> None:
    tenancy = make_tenancy(f"sqlite:///{tmp_path / 'a.db'}", tmp_path, plans=_plan(requests_per_minute=2),
                           rate_window_s=WINDOW)
    tenancy.create_tenant("acme")
    key = tenancy.create_key("acme").key
    _not_near_boundary()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    with TestClient(tenancy_app(tenancy)) as client:
        ok = [client.post("/v1/chat/completions", headers={"X-API-Key": key}, json=body) for _ in range(2)]
        assert [r.headers["x-ratelimit-remaining-requests"] for r in ok] == ["1", "0"]
        r = client.post("/v1/chat/completions", headers={"X-API-Key": key}, json=body)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) > 0
    assert r.headers["x-ratelimit-limit-requests"] == "2" and r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    tenancy.close()
