"""`genserve adapters add|list|delete|delete-tenant|gc`, straight against the app database and result store.

`--config PATH` (a Serve YAML, default configs/local.yaml) gives the database, the store and the
models; `--tenant NAME` acts on that tenant's adapters, without it on the global ones.

    genserve adapters add ink ink-lora.zip --base-model sdxl            # global
    genserve adapters add ink ink-lora.zip --base-model sdxl --tenant acme
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from sqlalchemy import select

from serve_app.adapters.registry import AdapterRegistry, build_registry
from serve_app.adapters.types import Adapter
from serve_app.errors import APIError


@contextmanager
def _registry(config_path: Path) -> Iterator[AdapterRegistry]:
    from serve_app.config import load_serve_config_file
    from serve_app.storage import build_store
    from serve_app.tenancy.db import make_engine, upgrade

    try:
        _, cfg = load_serve_config_file(config_path)
    except Exception as e:  # noqa: BLE001 - shown as a usage error
        raise click.BadParameter(str(e), param_hint="--config") from None
    engine = make_engine(cfg.tenancy.resolved_database_url(cfg.work_dir), pool_size=2)
    try:
        upgrade(engine)
        yield build_registry(cfg, engine, build_store(cfg.storage, cfg.work_dir, public_base_url=cfg.public_base_url))
    except APIError as e:
        raise click.ClickException(e.message) from None
    finally:
        engine.dispose()


def _tenant_id(reg: AdapterRegistry, tenant: str | None) -> int | None:
    if tenant is None:
        return None
    from serve_app.tenancy.db import read_tx
    from serve_app.tenancy.models import Tenant

    with read_tx(reg.engine) as conn:
        tid = conn.execute(select(Tenant.id).where(Tenant.name == tenant)).scalar()
    if tid is None:
        raise click.ClickException(f"No tenant named {tenant!r}.")
    return int(tid)


def _opts(fn: Any) -> Any:
    fn = click.option("--tenant", default=None, help="Tenant name (default: global adapters).")(fn)
    return click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                        default=Path("configs/local.yaml"), show_default=True, help="Serve config YAML.")(fn)


def _line(a: Adapter) -> str:
    owner = "global" if a.owner is None else f"tenant {a.owner}"
    return f"{a.id}  {a.name}  {a.kind}  base={a.base_model}  r={a.rank}  {a.size_bytes} bytes  {owner}"


@click.group(help="LoRA adapters (docs/lora.md).")
def adapters() -> None: ...


@adapters.command("add", help="Register FILE (a zipped PEFT LoRA directory) as NAME.")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--base-model", required=True, help="A configured model name or alias.")
@_opts
def add(name: str, file: Path, base_model: str, tenant: str | None, config_path: Path) -> None:
    with _registry(config_path) as reg:
        a = reg.create(_tenant_id(reg, tenant), name=name, base_model=base_model, data=file.read_bytes())
    click.echo(_line(a))


@adapters.command("list")
@_opts
def list_(tenant: str | None, config_path: Path) -> None:
    with _registry(config_path) as reg:
        tid = _tenant_id(reg, tenant)
        for a in reg.list(tid, allow_global=tid is None, limit=200):
            click.echo(_line(a))


@adapters.command("delete", help="Delete NAME (or id): its row, and its stored archive unless another row shares it.")
@click.argument("name")
@_opts
def delete(name: str, tenant: str | None, config_path: Path) -> None:
    with _registry(config_path) as reg:
        a = reg.delete(_tenant_id(reg, tenant), name)
    click.echo(f"deleted {a.name} ({a.id})")


@adapters.command("delete-tenant", help="Delete every private adapter of tenant NAME: rows, then the stored archives "
                  "no other tenant or global adapter shares. The step a tenant's removal needs first.")
@click.argument("tenant")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("configs/local.yaml"), show_default=True, help="Serve config YAML.")
def delete_tenant(tenant: str, config_path: Path) -> None:
    with _registry(config_path) as reg:
        tid = _tenant_id(reg, tenant)
        assert tid is not None
        removed = reg.delete_tenant_adapters(tid)
    click.echo(f"deleted the adapters of tenant {tenant}; {len(removed)} stored archive(s) removed")


@adapters.command("gc", help="Delete stored adapter archives no row names (left by a crash or a store failure "
                  "during a delete).")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("configs/local.yaml"), show_default=True, help="Serve config YAML.")
def gc(config_path: Path) -> None:
    with _registry(config_path) as reg:
        removed = reg.sweep_orphans()
    click.echo(f"removed {len(removed)} orphaned archive(s)" + "".join(f"\n  {k}" for k in removed))
