"""Deleting a tenant's adapters (issue 21): the rows and the stored archives go, on the local store
and on a real S3-protocol server (moto), SQLite and Postgres; archives another tenant or a global
adapter shares stay; a store failure after the rows are gone leaves only an unreachable object
that `sweep_orphans` (`genserve adapters gc`) removes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from adapter_files import peft_zip
from servers import db_url, make_tenancy, postgres_server  # noqa: F401  (fixtures)
from sqlalchemy import select
from test_storage_s3 import moto_bucket, moto_endpoint, s3cfg  # noqa: F401  (fixtures)

from serve_app.adapters.config import AdaptersConfig
from serve_app.adapters.registry import AdapterRegistry, base_models
from serve_app.adapters.types import Adapter
from serve_app.config import AppConfig, DiffusionModelConfig
from serve_app.errors import APIError
from serve_app.storage import LocalResultStore, ResultStore, S3ResultStore
from serve_app.storage.s3 import client_kwargs

CFG = AppConfig(diffusion_models=[DiffusionModelConfig(name="sdxl-tiny", family="sdxl", model="none")])


class BrokenDeletes:
    """Mixin: `delete` fails while `broken` is set (the store went away after the rows committed)."""

    broken = False

    def delete(self, key: str) -> None:
        if self.broken:
            raise OSError("store unreachable")
        super().delete(key)  # type: ignore[misc]


class LocalStore(BrokenDeletes, LocalResultStore): ...


class S3Store(BrokenDeletes, S3ResultStore): ...


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ResultStore:
    if request.param == "local":
        return LocalStore(tmp_path / "results", signing_key=b"s" * 32)
    endpoint = request.getfixturevalue("moto_bucket")
    # One prefix per test: the moto server and its bucket are shared by the module.
    return S3Store(s3cfg(endpoint, prefix=f"t-{uuid.uuid4().hex[:8]}/"))


@pytest.fixture
def env(db_url: str, tmp_path: Path, store: ResultStore) -> Iterator[tuple[AdapterRegistry, dict[str, int]]]:  # noqa: F811
    tenancy = make_tenancy(db_url, tmp_path)
    for name in ("acme", "bolt"):
        tenancy.create_tenant(name)
    from serve_app.tenancy.models import Tenant

    with tenancy.engine.connect() as conn:
        ids = dict(conn.execute(select(Tenant.name, Tenant.id)).all())
    reg = AdapterRegistry(tenancy.engine, store, models=base_models(CFG),
                          config=AdaptersConfig(max_upload_mb=1, max_rank=64), cache_dir=tmp_path / "cache")
    yield reg, ids
    tenancy.close()


def stored(store: ResultStore) -> set[str]:
    keys = set(store.list_keys("adapters"))
    if isinstance(store, S3ResultStore):  # cross-check with a plain client: the objects, not the store's view
        listed = boto3.client("s3", **client_kwargs(store.cfg)).list_objects_v2(
            Bucket=store.cfg.bucket, Prefix=store.cfg.prefix + "adapters/")
        assert {o["Key"][len(store.cfg.prefix):] for o in listed.get("Contents", [])} == keys
    return keys


def add(reg: AdapterRegistry, owner: int | None, name: str, seed: int) -> Adapter:
    return reg.create(owner, name=name, base_model="sdxl-tiny", data=peft_zip(seed=seed))


def test_tenant_delete_removes_its_objects_and_keeps_shared_and_others(env) -> None:  # type: ignore[no-untyped-def]
    reg, ids = env
    acme, bolt = ids["acme"], ids["bolt"]
    solo, solo2 = add(reg, acme, "solo", 1), add(reg, acme, "solo2", 2)
    shared = add(reg, acme, "shared", 3)
    add(reg, bolt, "theirs", 4)
    theirs_shared = add(reg, bolt, "same-as-acme", 3)
    glob, acme_glob = add(reg, None, "glob", 5), add(reg, acme, "copy-of-glob", 5)
    assert theirs_shared.storage_key == shared.storage_key and acme_glob.storage_key == glob.storage_key
    reg.materialize(solo)  # the ingress's local cache of it
    assert (reg.cache_dir / solo.id).is_dir()
    before = stored(reg.store)
    assert len(before) == 5

    removed = reg.delete_tenant_adapters(acme)

    # Only acme's unshared archives went; its cache too.
    assert sorted(removed) == sorted([solo.storage_key, solo2.storage_key])
    assert stored(reg.store) == before - {solo.storage_key, solo2.storage_key}
    assert not (reg.cache_dir / solo.id).exists()
    # acme has no private adapter left, by name or by id; the global one is still visible to it.
    assert [a.name for a in reg.list(acme)] == ["glob"]
    for name in ("solo", solo.id, "shared", "copy-of-glob"):
        with pytest.raises(APIError) as e:
            reg.get(acme, name, allow_global=False)
        assert e.value.status == 404
    # bolt's adapters (one sharing acme's former archive) and the global one are intact and load.
    assert {a.name for a in reg.list(bolt, allow_global=False)} == {"theirs", "same-as-acme"}
    for a in (reg.get(bolt, "theirs"), reg.get(bolt, "same-as-acme"), reg.get(None, "glob")):
        assert (reg.materialize(a) / "adapter_model.safetensors").is_file()
    # Idempotent: nothing left to delete.
    assert reg.delete_tenant_adapters(acme) == []


def test_store_failure_after_the_rows_leaves_only_unreachable_garbage(env) -> None:  # type: ignore[no-untyped-def]
    reg, ids = env
    acme, bolt = ids["acme"], ids["bolt"]
    solo, kept = add(reg, acme, "solo", 1), add(reg, bolt, "kept", 2)
    reg.store.broken = True  # a crash or outage between the committed row delete and the object delete
    assert reg.delete_tenant_adapters(acme) == []
    reg.store.broken = False
    # The rows are gone: nothing reaches the object (by name, by id), though it is still stored.
    assert reg.list(acme) == []
    with pytest.raises(APIError) as e:
        reg.get(acme, solo.id)
    assert e.value.status == 404
    assert stored(reg.store) == {solo.storage_key, kept.storage_key}
    # The sweep removes exactly the garbage; a second one finds none.
    assert reg.sweep_orphans() == [solo.storage_key]
    assert stored(reg.store) == {kept.storage_key}
    assert reg.sweep_orphans() == []
    assert reg.get(bolt, "kept").id == kept.id


def test_cli_delete_tenant_and_gc(tmp_path: Path) -> None:
    import yaml
    from click.testing import CliRunner

    from serve_app.cli import main
    from serve_app.config import load_serve_config_file
    from serve_app.tenancy import Tenancy

    cfg_path = tmp_path / "serve.yaml"
    cfg_path.write_text(yaml.safe_dump({"applications": [{
        "name": "genserve", "import_path": "serve_app.graph:build_app",
        "args": {"work_dir": str(tmp_path / "work"),
                 "diffusion_models": [{"name": "sdxl-tiny", "family": "sdxl", "model": "none"}]}}]}))
    _, cfg = load_serve_config_file(cfg_path)
    tenancy = Tenancy(cfg.tenancy, work_dir=cfg.work_dir)
    tenancy.create_tenant("acme")
    tenancy.close()
    (tmp_path / "a.zip").write_bytes(peft_zip(seed=1))
    (tmp_path / "g.zip").write_bytes(peft_zip(seed=2))
    run = CliRunner().invoke
    conf = ["--config", str(cfg_path)]
    for args in (["a.zip", "--tenant", "acme"], ["g.zip"]):
        r = run(main, ["adapters", "add", "x", str(tmp_path / args[0]), "--base-model", "sdxl-tiny", *args[1:], *conf])
        assert r.exit_code == 0, r.output
    objects = tmp_path / "work" / "results" / "adapters"
    assert len(list(objects.glob("*.zip"))) == 2
    r = run(main, ["adapters", "delete-tenant", "acme", *conf])
    assert r.exit_code == 0 and "1 stored archive(s) removed" in r.output, r.output
    assert len(list(objects.glob("*.zip"))) == 1  # the global one
    r = run(main, ["adapters", "list", *conf])
    assert r.exit_code == 0 and "global" in r.output
    (objects / "ad_0123456789abcdef0123456789abcdef.zip").write_bytes(b"left by a crash")
    r = run(main, ["adapters", "gc", *conf])
    assert r.exit_code == 0 and "removed 1 orphaned" in r.output, r.output
    assert len(list(objects.glob("*.zip"))) == 1
    r = run(main, ["adapters", "delete-tenant", "ghost", *conf])
    assert r.exit_code != 0 and "No tenant named 'ghost'" in r.output
