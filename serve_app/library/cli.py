"""`genserve templates add|list|show|render|delete|seed`, straight against the app database.

Same options as `genserve tenants`: `--config PATH` (a Serve YAML) or `--database-url URL`.
`--tenant NAME` acts on that tenant's templates; without it, on the shared ones every tenant sees.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import yaml
from sqlalchemy import select

from serve_app.errors import APIError
from serve_app.library.protocol import TemplateCreate, TemplateOut
from serve_app.library.service import Library
from serve_app.tenancy.cli import _common, load_tenancy_config
from serve_app.tenancy.db import make_engine, read_tx, upgrade
from serve_app.tenancy.models import Tenant

SEED_FILE = Path(__file__).resolve().parent / "seed_templates.yaml"


@contextmanager
def _library(config_path: str | None, database_url: str | None, app_name: str | None) -> Iterator[Library]:
    cfg, work_dir = load_tenancy_config(config_path, database_url, app_name)
    engine = make_engine(cfg.resolved_database_url(work_dir), pool_size=2)
    try:
        upgrade(engine)
        yield Library(engine)
    except APIError as e:
        raise click.ClickException(e.message) from None
    finally:
        engine.dispose()


def _tenant_id(lib: Library, tenant: str | None) -> int | None:
    if tenant is None:
        return None
    with read_tx(lib.engine) as conn:
        tid = conn.execute(select(Tenant.id).where(Tenant.name == tenant)).scalar()
    if tid is None:
        raise click.ClickException(f"No tenant named {tenant!r}.")
    return tid


def _tenant_opt(fn: Any) -> Any:
    return click.option("--tenant", default=None, help="Tenant name (default: shared templates).")(fn)


def _show(t: TemplateOut) -> str:
    rating = f"{t.avg_rating:.2f} ({t.rating_count})" if t.avg_rating is not None else "-"
    return (f"name: {t.name}\nversion: {t.version}\ncategory: {t.category}\nshared: {t.shared}\n"
            f"tags: {', '.join(t.tags) or '-'}\ndefaults: {t.defaults or '-'}\nvariables: {', '.join(t.variables)}\n"
            f"rating: {rating}\ncreated: {t.created_at.isoformat(timespec='seconds')}\ntemplate: {t.template}")


@click.group(help="Versioned prompt templates.")
def templates() -> None: ...


@templates.command("add", help="Create NAME, or save its next version.")
@click.argument("name")
@click.option("--template", "text", required=True, help="Text with {placeholders}.")
@click.option("--category", default="general", show_default=True)
@click.option("--tag", "tags", multiple=True, help="Repeatable.")
@click.option("--defaults", default="", help="Default parameters, e.g. '--ar 16:9 --s 250'.")
@_tenant_opt
@_common
def add(name: str, text: str, category: str, tags: tuple[str, ...], defaults: str, tenant: str | None,
        config_path: str | None, database_url: str | None, app_name: str | None) -> None:
    with _library(config_path, database_url, app_name) as lib:
        out = lib.templates.save(_tenant_id(lib, tenant), TemplateCreate(
            name=name, template=text, category=category, defaults=defaults, tags=list(tags)))
    click.echo(f"saved {out.name} version {out.version}")


@templates.command("list", help="Latest version of each template, filtered.")
@click.option("--category", default=None)
@click.option("--tag", default=None, help="Exact tag.")
@click.option("-q", "--query", "q", default=None, help="Case-insensitive text in name or template.")
@click.option("--limit", type=click.IntRange(1, 200), default=200)
@_tenant_opt
@_common
def list_(category: str | None, tag: str | None, q: str | None, limit: int, tenant: str | None,
          config_path: str | None, database_url: str | None, app_name: str | None) -> None:
    with _library(config_path, database_url, app_name) as lib:
        page = lib.templates.search(_tenant_id(lib, tenant), category=category, tag=tag, q=q, limit=limit)
    for t in page.data:
        rating = f"{t.avg_rating:.2f}" if t.avg_rating is not None else "-"
        click.echo(f"{t.name}\tv{t.version}\t{t.category}\t{','.join(t.tags) or '-'}\t{rating}\t"
                   f"{'shared' if t.shared else 'own'}")


@templates.command("show")
@click.argument("name")
@click.option("--version", type=click.IntRange(min=1), default=None)
@_tenant_opt
@_common
def show(name: str, version: int | None, tenant: str | None, config_path: str | None, database_url: str | None,
         app_name: str | None) -> None:
    with _library(config_path, database_url, app_name) as lib:
        click.echo(_show(lib.templates.get(_tenant_id(lib, tenant), name, version)))


@templates.command("delete", help="Soft-delete NAME (all versions, or --version).")
@click.argument("name")
@click.option("--version", type=click.IntRange(min=1), default=None)
@_tenant_opt
@_common
def delete(name: str, version: int | None, tenant: str | None, config_path: str | None, database_url: str | None,
           app_name: str | None) -> None:
    with _library(config_path, database_url, app_name) as lib:
        n = lib.templates.delete(_tenant_id(lib, tenant), name, version)
    click.echo(f"deleted {n} version(s) of {name}")


def _parse_vars(pairs: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected k=v, got {p!r}", param_hint="--var")
        out[key] = value
    return out


@templates.command("render", help="Render NAME the way a generation request would, and print the result.")
@click.argument("name")
@click.option("--var", "pairs", multiple=True, help="k=v, repeatable.")
@click.option("--prompt", default="", help="The request's prompt ({prompt} in the template; its flags apply).")
@click.option("--version", type=click.IntRange(min=1), default=None)
@click.option("--model", default=None)
@click.option("--seed", type=int, default=None)
@_tenant_opt
@_common
def render(name: str, pairs: tuple[str, ...], prompt: str, version: int | None, model: str | None,
           seed: int | None, tenant: str | None, config_path: str | None, database_url: str | None,
           app_name: str | None) -> None:
    from serve_app.config import load_app_config
    from serve_app.images.protocol import PromptRenderRequest
    from serve_app.images.render import render_image_request

    if config_path is None:
        raise click.UsageError("render needs --config (the models' sizes and steps come from it)")
    doc = yaml.safe_load(Path(config_path).read_text()) or {}
    apps = doc.get("applications") or []
    app = apps[0] if app_name is None else next((a for a in apps if a.get("name") == app_name), {})
    app_cfg = load_app_config(app.get("args") or {})
    with _library(config_path, database_url, app_name) as lib:
        lib = Library(lib.engine, app_cfg.templates)
        source = lib.for_tenant(_tenant_id(lib, tenant))
        # The request's prompt may be empty here: the template alone is rendered ({prompt} = "").
        body = PromptRenderRequest.model_construct(prompt=prompt, model=model, seed=seed, template=name,
                                                   template_version=version, variables=_parse_vars(pairs))
        spec = render_image_request(app_cfg, source, body)
    click.echo(spec.prompt)
    info = spec.describe()
    if spec.template is not None:
        t = spec.template
        info["template"] = {"name": t.name, "version": t.version, "source": t.source}
    click.echo(json.dumps(info, indent=2))


@templates.command("seed", help="Load the example templates (idempotent: unchanged ones are skipped).")
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=SEED_FILE,
              show_default=True)
@_tenant_opt
@_common
def seed(path: Path, tenant: str | None, config_path: str | None, database_url: str | None,
         app_name: str | None) -> None:
    with _library(config_path, database_url, app_name) as lib:
        added, same = seed_templates(lib, _tenant_id(lib, tenant), path)
    click.echo(f"seeded {added} template(s); {same} already up to date")


def seed_templates(lib: Library, tenant_id: int | None, path: Path = SEED_FILE) -> tuple[int, int]:
    doc = yaml.safe_load(path.read_text()) or {}
    added = same = 0
    for raw in doc.get("templates") or []:
        body = TemplateCreate.model_validate(raw)
        current = lib.templates.resolve(tenant_id, body.name)
        if current is not None and current.source != "config":
            cur = lib.templates.get(tenant_id, body.name)
            wanted = lib_normalized(body)
            if (cur.template, cur.category, cur.defaults, cur.tags) == wanted and cur.shared == (tenant_id is None):
                same += 1
                continue
        lib.templates.save(tenant_id, body)
        added += 1
    return added, same


def lib_normalized(body: TemplateCreate) -> tuple[str, str, str, list[str]]:
    from serve_app.library import validation as v

    return (v.check_template(body.template), v.check_category(body.category), v.check_defaults(body.defaults),
            v.check_tags(body.tags))
