"""/v1/templates and /v1/generations over HTTP with real API keys on SQLite and Postgres."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from servers import db_url, make_tenancy, postgres_server  # noqa: F401  (fixtures)

from serve_app.config import AppConfig, DiffusionModelConfig
from serve_app.errors import install_error_handlers
from serve_app.library import Library, library_router
from serve_app.state import Services
from serve_app.storage import LocalResultStore, files_router


@pytest.fixture
def api(db_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, dict, dict, Library]]:  # noqa: F811
    tenancy = make_tenancy(db_url, tmp_path, auth_cache_s=0)
    for name in ("acme", "bolt"):
        tenancy.create_tenant(name)
    keys = {n: {"Authorization": f"Bearer {tenancy.create_key(n).key}"} for n in ("acme", "bolt")}
    lib = Library(tenancy.engine)
    store = LocalResultStore(tmp_path / "results", signing_key=b"s" * 32, public_base_url="http://testserver")
    app = FastAPI()
    install_error_handlers(app)
    cfg = AppConfig(diffusion_models=[DiffusionModelConfig(name="tiny", family="sdxl", model="none")])
    app.state.services = Services(config=cfg, tenancy=tenancy, library=lib, storage=store)
    app.include_router(library_router)
    app.include_router(files_router)
    with TestClient(app) as client:
        yield client, keys["acme"], keys["bolt"], lib
    tenancy.close()


def err(r: Any) -> tuple[int, str | None, str | None]:
    body = r.json()["error"]
    return r.status_code, body["param"], body["code"]


def test_template_crud_and_isolation(api) -> None:  # type: ignore[no-untyped-def]
    client, acme, bolt, lib = api
    body = {"name": "shot", "template": "{product} on {surface}", "category": "product", "tags": ["studio"],
            "defaults": "--ar 1:1"}
    r = client.post("/v1/templates", json=body, headers=acme)
    assert r.status_code == 201 and r.json()["version"] == 1 and r.json()["variables"] == ["product", "surface"]
    r = client.post("/v1/templates", json={**body, "template": "{product} on {surface}, v2"}, headers=acme)
    assert r.json()["version"] == 2
    assert client.get("/v1/templates/shot", headers=acme).json()["version"] == 2
    assert client.get("/v1/templates/shot?version=1", headers=acme).json()["template"] == "{product} on {surface}"
    versions = client.get("/v1/templates/shot/versions", headers=acme).json()
    assert versions["object"] == "list" and [v["version"] for v in versions["data"]] == [2, 1]
    listed = client.get("/v1/templates?category=product&tag=studio", headers=acme).json()
    assert listed["total"] == 1 and listed["data"][0]["name"] == "shot"
    assert client.get("/v1/templates?tag=stud", headers=acme).json()["total"] == 0
    assert client.get("/v1/templates?q=SURFACE", headers=acme).json()["total"] == 1
    # Another tenant sees none of it: 404s, an empty list.
    assert err(client.get("/v1/templates/shot", headers=bolt))[::2] == (404, "template_not_found")
    assert client.get("/v1/templates/shot/versions", headers=bolt).status_code == 404
    assert client.delete("/v1/templates/shot", headers=bolt).status_code == 404
    assert client.get("/v1/templates", headers=bolt).json()["total"] == 0
    # Soft delete.
    r = client.delete("/v1/templates/shot", headers=acme)
    assert r.status_code == 200 and r.json()["versions_deleted"] == 2
    assert client.get("/v1/templates/shot", headers=acme).status_code == 404
    assert client.get("/v1/templates/shot?version=1", headers=acme).status_code == 404
    assert client.post("/v1/templates", json=body, headers=acme).json()["version"] == 3  # numbers not reused


def test_bad_input_statuses(api) -> None:  # type: ignore[no-untyped-def]
    client, acme, _, _ = api
    assert client.get("/v1/templates").status_code == 401
    assert err(client.post("/v1/templates", json={"name": "x", "template": "{0.__init__}"}, headers=acme))[:2] == (
        400, "template")
    assert err(client.post("/v1/templates", json={"name": "x"}, headers=acme))[:2] == (400, "template")
    assert err(client.post("/v1/templates", json={"name": "x", "template": "t", "extra": 1}, headers=acme))[:2] == (
        400, "extra")
    assert err(client.post("/v1/templates", json={"name": "a b", "template": "t"}, headers=acme))[:2] == (400, "name")
    assert err(client.get("/v1/templates?limit=0", headers=acme))[:2] == (422, "limit")  # out of range
    assert err(client.get("/v1/templates/x?version=0", headers=acme))[:2] == (400, "version")
    assert err(client.get("/v1/templates/missing", headers=acme))[0] == 404


def test_ratings_and_generations(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, acme, bolt, lib = api
    client.post("/v1/templates", json={"name": "shot", "template": "{subject}"}, headers=acme)
    from sqlalchemy import select

    from serve_app.tenancy.models import Tenant

    with lib.engine.connect() as conn:
        ids = dict(conn.execute(select(Tenant.name, Tenant.id)).all())
    shot = lib.for_tenant(ids["acme"]).get("shot")
    store = client.app.state.services.storage  # type: ignore[attr-defined]
    key = store.put("acme/2026/01/01/img_x.png", b"\x89PNG")
    gids = [lib.generations.log(ids["acme"], prompt=f"p{i}", model="tiny", seeds=[i], params={"steps": 2},
                               template=shot, result_keys=[key], latency_s=0.1) for i in range(3)]
    other = lib.generations.log(ids["bolt"], prompt="theirs", model="tiny", seeds=[9], params={})
    r = client.post(f"/v1/generations/{gids[0]}/rating", json={"rating": 5}, headers=acme)
    assert r.status_code == 200 and r.json()["rating"] == 5 and r.json()["rated_at"]
    client.post(f"/v1/generations/{gids[1]}/rating", json={"rating": 2}, headers=acme)
    assert err(client.post(f"/v1/generations/{gids[0]}/rating", json={"rating": 6}, headers=acme))[:2] == (
        400, "rating")
    assert client.post(f"/v1/generations/{gids[0]}/rating", json={"rating": 4}, headers=bolt).status_code == 404
    assert client.post(f"/v1/generations/{other}/rating", json={"rating": 4}, headers=acme).status_code == 404
    t = client.get("/v1/templates", headers=acme).json()["data"][0]
    assert (t["avg_rating"], t["rating_count"]) == (3.5, 2)
    page = client.get("/v1/generations?limit=2", headers=acme).json()
    assert page["total"] == 3 and len(page["data"]) == 2
    assert other not in {g["id"] for g in page["data"]}
    rest = client.get("/v1/generations?limit=2&offset=2", headers=acme).json()["data"]
    assert len(rest) == 1 and {g["id"] for g in page["data"] + rest} == set(gids)
    assert client.get("/v1/generations?rated=true", headers=acme).json()["total"] == 2
    g = client.get(f"/v1/generations/{gids[2]}", headers=acme).json()
    assert g["template"] == "shot" and g["template_version"] == 1 and g["seeds"] == [2]
    # Listed URLs are freshly signed from the stored keys, and they work.
    url = g["result_urls"][0]
    assert url.startswith("http://testserver/files/acme/")
    assert client.get(url.replace("http://testserver", "")).content == b"\x89PNG"
    assert client.get(f"/v1/generations/{other}", headers=acme).status_code == 404
