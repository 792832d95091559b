"""The LoRA adapter registry (serve_app/adapters) on real SQLite and Postgres, with the local
result store: upload checks, isolation between tenants, global adapters, limits, and that a
failure midway leaves neither a row nor an object."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from adapter_files import lora_tensors, peft_zip
from servers import db_url, make_tenancy, postgres_server  # noqa: F401  (fixtures)
from sqlalchemy import func, select

from serve_app.adapters.config import AdaptersConfig
from serve_app.adapters.models import AdapterRow
from serve_app.adapters.registry import AdapterRegistry, base_models
from serve_app.adapters.source import StoreAdapterSource, materialize
from serve_app.config import AppConfig, DiffusionModelConfig, LLMModelConfig
from serve_app.errors import APIError
from serve_app.storage import LocalResultStore, StorageError
from serve_app.storage.config import StorageConfig

CFG = AppConfig(diffusion_models=[
    DiffusionModelConfig(name="sdxl-tiny", family="sdxl", model="none", aliases=["v6"]),
    DiffusionModelConfig(name="w-tiny", family="wuerstchen", model="none")],
    llm_models=[LLMModelConfig(name="chat-tiny", model="none", lora={"enabled": True})])


class FailingStore(LocalResultStore):
    """Writes part of the object, then fails: a storage outage in the middle of an upload."""

    fail = False

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> str:
        if self.fail:
            path = self.path_of(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[: len(data) // 2])
            raise StorageError("disk went away", key=key)
        return super().put(key, data, content_type)


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> Iterator[tuple[AdapterRegistry, int, int, FailingStore]]:  # noqa: F811
    tenancy = make_tenancy(db_url, tmp_path)
    tenancy.create_tenant("acme")
    tenancy.create_tenant("bolt")
    from serve_app.tenancy.models import Tenant

    with tenancy.engine.connect() as conn:
        tid = dict(conn.execute(select(Tenant.name, Tenant.id)).all())
    store = FailingStore(tmp_path / "results", signing_key=b"s" * 32)
    reg = AdapterRegistry(tenancy.engine, store, models=base_models(CFG),
                          config=AdaptersConfig(max_upload_mb=1, max_rank=64), cache_dir=tmp_path / "cache")
    yield reg, tid["acme"], tid["bolt"], store
    tenancy.close()


def status(fn, *args, **kw) -> tuple[int, str | None, str | None]:  # type: ignore[no-untyped-def]
    with pytest.raises(APIError) as info:
        fn(*args, **kw)
    return info.value.status, info.value.param, info.value.code


def rows(reg: AdapterRegistry) -> int:
    with reg.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(AdapterRow)).scalar_one())


def objects(store: LocalResultStore) -> list[Path]:
    root = store.root / "adapters"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_upload_reads_rank_targets_and_stores_by_content(env) -> None:  # type: ignore[no-untyped-def]
    reg, acme, bolt, store = env
    data = peft_zip(rank=8, folder="my-lora/", config={"lora_alpha": 16, "target_modules": ["proj_in", "to_q"]})
    a = reg.create(acme, name="ink", base_model="v6", data=data)
    assert (a.kind, a.base_model, a.rank, a.alpha, a.owner) == ("diffusion", "sdxl-tiny", 8, 16.0, acme)
    assert a.target_modules == ("proj_in", "to_q")
    stored = store.get(a.storage_key)
    assert hashlib.sha256(stored).hexdigest() == a.sha256 and a.id == "ad_" + a.sha256[:32]
    # The same archive from another tenant shares the object; a re-zip of the same files too (canonical form).
    b = reg.create(bolt, name="mine", base_model="sdxl-tiny", data=peft_zip(
        rank=8, config={"lora_alpha": 16, "target_modules": ["proj_in", "to_q"]}))
    assert b.id == a.id and len(objects(store)) == 1
    # Materialized once per content, checked against the id.
    d = reg.materialize(a)
    assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert d.name == a.id
    # Deleting one row keeps the object the other still uses; deleting the last removes it.
    reg.delete(acme, "ink")
    assert len(objects(store)) == 1
    reg.delete(bolt, a.id)
    assert objects(store) == [] and rows(reg) == 0


def test_bad_archives_are_400_naming_file(env) -> None:  # type: ignore[no-untyped-def]
    reg, acme, _, store = env
    def up(data: bytes, name: str = "x", base_model: str = "sdxl-tiny") -> object:
        return reg.create(acme, name=name, base_model=base_model, data=data)

    assert status(up, b"not a zip") == (400, "file", "invalid_adapter")
    assert status(up, peft_zip(config={"peft_type": "IA3"})) == (400, "file", "unsupported_adapter")
    assert status(up, peft_zip(config={"r": 5})) == (400, "file", "adapter_rank")  # tensors are rank 4
    assert status(up, peft_zip(rank=65)) == (400, "file", "adapter_rank")  # over max_rank
    assert status(up, peft_zip(lora_tensors(prefix="model.layers."))) == (400, "file", "adapter_base_mismatch")
    assert status(up, peft_zip(extra={"big.bin": b"\0" * (2 << 20)})) == (400, "file", "adapter_too_large")
    bad_header = peft_zip(extra={})
    assert status(up, bad_header.replace(b"adapter_model.safetensors", b"adapter_model.safetensorz")) == \
        (400, "file", "invalid_adapter")
    assert status(up, peft_zip(), base_model="nope") == (400, "base_model", "unknown_base_model")
    assert status(up, peft_zip(), base_model="w-tiny") == (400, "base_model", "unsupported_base_model")
    assert status(up, peft_zip(), name="../x") == (400, "name", "invalid_adapter_name")
    assert rows(reg) == 0 and objects(store) == []


def test_llm_adapters_take_peft_names(env) -> None:  # type: ignore[no-untyped-def]
    reg, acme, _, _ = env
    t = lora_tensors(modules=("model.layers.0.self_attn.q_proj",))
    a = reg.create(acme, name="support-bot", base_model="chat-tiny", data=peft_zip(t))
    assert a.kind == "llm"
    assert reg.resolve(acme, "llm", "support-bot").id == a.id
    assert status(reg.resolve, acme, "diffusion", "support-bot") == (404, "name", "adapter_not_found")


def test_tenants_never_see_each_others_adapters(env) -> None:  # type: ignore[no-untyped-def]
    reg, acme, bolt, _ = env
    a = reg.create(acme, name="secret", base_model="sdxl-tiny", data=peft_zip(seed=1))
    for fn, args in ((reg.resolve, (bolt, "diffusion", "secret")), (reg.resolve, (bolt, "diffusion", a.id)),
                     (reg.get, (bolt, "secret")), (reg.delete, (bolt, "secret"))):
        assert status(fn, *args)[0] == 404
    assert [x.name for x in reg.list(bolt)] == []
    assert [x.name for x in reg.list(acme)] == ["secret"]
    # Global adapters: visible to all unless the plan says no; a private name shadows a global one.
    g = reg.create(None, name="shared", base_model="sdxl-tiny", data=peft_zip(seed=2))
    assert reg.resolve(bolt, "diffusion", "shared").id == g.id
    assert status(reg.resolve, bolt, "diffusion", "shared", allow_global=False)[0] == 404
    own = reg.create(bolt, name="shared", base_model="sdxl-tiny", data=peft_zip(seed=3))
    assert reg.resolve(bolt, "diffusion", "shared").id == own.id
    assert status(reg.delete, acme, "shared")[0] == 404  # a tenant can't delete a global adapter
    assert status(reg.resolve, bolt, "diffusion", "shared", base_model="other") == \
        (400, "name", "adapter_base_mismatch")


def test_limits_and_conflicts(env) -> None:  # type: ignore[no-untyped-def]
    reg, acme, _, _ = env
    reg.create(acme, name="a", base_model="sdxl-tiny", data=peft_zip(seed=1), max_adapters=2)
    assert status(reg.create, acme, name="a", base_model="sdxl-tiny", data=peft_zip(seed=2)) == \
        (409, "name", "adapter_exists")
    assert status(reg.create, acme, name="b", base_model="sdxl-tiny", data=peft_zip(seed=1)) == \
        (409, "name", "adapter_exists")
    reg.create(acme, name="b", base_model="sdxl-tiny", data=peft_zip(seed=2), max_adapters=2)
    assert status(reg.create, acme, name="c", base_model="sdxl-tiny", data=peft_zip(seed=3), max_adapters=2) == \
        (403, "file", "adapter_limit_reached")


def test_upload_failing_midway_leaves_no_row_and_no_object(env) -> None:  # type: ignore[no-untyped-def]
    reg, acme, _, store = env
    store.fail = True
    assert status(reg.create, acme, name="x", base_model="sdxl-tiny", data=peft_zip())[0] == 503
    assert rows(reg) == 0 and objects(store) == []
    store.fail = False
    # A failure after the object was stored (the row can't be committed) removes the object again.
    reg.create(acme, name="x", base_model="sdxl-tiny", data=peft_zip(seed=1))
    n_objects = len(objects(store))
    orig = store.put

    def put_then_break_db(key: str, data: bytes, content_type: str = "image/png") -> str:
        orig(key, data, content_type)
        raise RuntimeError("database connection lost")

    store.put = put_then_break_db  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        reg.create(acme, name="y", base_model="sdxl-tiny", data=peft_zip(seed=2))
    assert rows(reg) == 1 and len(objects(store)) == n_objects


def test_replica_source_fetches_by_id_and_refuses_corruption(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    reg, acme, _, store = env
    a = reg.create(acme, name="x", base_model="sdxl-tiny", data=peft_zip())
    import pickle

    src = pickle.loads(pickle.dumps(StoreAdapterSource(
        StorageConfig(local={"dir": str(store.root)}), work_dir=tmp_path, cache_dir=tmp_path / "replica")))
    d = src.fetch(a.id)
    assert (d / "adapter_model.safetensors").is_file()
    b = reg.create(acme, name="y", base_model="sdxl-tiny", data=peft_zip(seed=9))
    store.path_of(b.storage_key).write_bytes(b"tampered")
    from serve_app.adapters.source import AdapterFetchError

    with pytest.raises(AdapterFetchError):
        materialize(store, b.id, tmp_path / "other")
    assert not (tmp_path / "other" / b.id).exists()


def test_cli_manages_global_and_tenant_adapters(tmp_path: Path) -> None:
    import yaml
    from click.testing import CliRunner

    from serve_app.cli import main

    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"applications": [{"name": "genserve", "import_path": "serve_app.graph:build_app",
                                                     "args": {"work_dir": str(tmp_path / "work"), "diffusion_models": [
                                                         {"name": "sdxl-tiny", "family": "sdxl", "model": "none"}]}}]}))
    (tmp_path / "a.zip").write_bytes(peft_zip(seed=4))
    run = CliRunner().invoke
    r = run(main, ["adapters", "add", "ink", str(tmp_path / "a.zip"), "--base-model", "sdxl-tiny", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "ink" in r.output and "global" in r.output
    r = run(main, ["adapters", "list", "--config", str(cfg)])
    assert r.exit_code == 0 and "ink" in r.output
    r = run(main, ["adapters", "add", "ink", str(tmp_path / "a.zip"), "--base-model", "nope", "--config", str(cfg)])
    assert r.exit_code != 0 and "Unknown base_model" in r.output
    r = run(main, ["adapters", "list", "--tenant", "ghost", "--config", str(cfg)])
    assert r.exit_code != 0 and "No tenant named 'ghost'" in r.output
    r = run(main, ["adapters", "delete", "ink", "--config", str(cfg)])
    assert r.exit_code == 0 and "deleted ink" in r.output
    assert not list((tmp_path / "work" / "results" / "adapters").glob("*.zip"))


def test_http_routes_limits_and_error_bodies(db_url: str, tmp_path: Path) -> None:  # noqa: F811
    from fastapi.testclient import TestClient

    from serve_app.app import create_app
    from serve_app.state import Services

    tenancy = make_tenancy(db_url, tmp_path, auth_cache_s=0)
    for name in ("acme", "bolt"):
        tenancy.create_tenant(name)
    keys = {n: {"Authorization": f"Bearer {tenancy.create_key(n).key}"} for n in ("acme", "bolt")}
    store = LocalResultStore(tmp_path / "results", signing_key=b"s" * 32)
    cfg = CFG.model_copy(update={"adapters": AdaptersConfig(max_upload_mb=0.25)})
    reg = AdapterRegistry(tenancy.engine, store, models=base_models(cfg), config=cfg.adapters,
                          cache_dir=tmp_path / "cache")
    app = create_app(Services(config=cfg, tenancy=tenancy, storage=store, adapters=reg))
    admin = {"Authorization": "Bearer admin-secret"}
    with TestClient(app) as client:
        def up(headers: dict, data: bytes, name: str = "ink", path: str = "/v1/adapters") -> Any:
            return client.post(path, headers=headers, data={"name": name, "base_model": "sdxl-tiny"},
                               files={"file": ("a.zip", data, "application/zip")})

        r = up(keys["acme"], peft_zip(seed=1))
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["object"] == "adapter" and body["owned_by"] == "tenant" and body["id"].startswith("ad_")
        assert client.get("/v1/adapters", headers=keys["acme"]).json()["data"][0]["name"] == "ink"
        assert client.get("/v1/adapters/ink", headers=keys["bolt"]).status_code == 404
        # Over the upload limit: 413 before the body is read; a bad archive: 400 naming `file`.
        r = up(keys["acme"], b"\0" * (400 * 1024), name="big")
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = up(keys["acme"], b"\0" * (300 * 1024), name="big")  # within the body limit, over the file limit
        assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_too_large"
        r = up(keys["acme"], b"not a zip", name="bad")
        assert r.status_code == 400 and r.json()["error"]["param"] == "file"
        r = client.post("/v1/adapters", headers=keys["acme"], json={"name": "x"})
        assert 400 <= r.status_code < 500 and "error" in r.json()
        # Global adapters through the admin API; the tenants see them.
        r = up(admin, peft_zip(seed=2), name="shared", path="/admin/adapters")
        assert r.status_code == 201 and r.json()["owned_by"] == "global"
        assert client.get("/v1/adapters/shared", headers=keys["bolt"]).status_code == 200
        assert up(keys["acme"], peft_zip(seed=3), path="/admin/adapters").status_code == 401
        assert client.delete("/v1/adapters/shared", headers=keys["bolt"]).status_code == 404
        assert client.delete("/admin/adapters/shared", headers=admin).status_code == 200
        assert client.delete("/v1/adapters/ink", headers=keys["acme"]).json()["deleted"] is True
    assert rows(reg) == 0 and objects(store) == []
    tenancy.close()
