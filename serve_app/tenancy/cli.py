"""`genserve tenants|keys|usage`: administer tenants straight against the app database.

Every command takes `--config PATH` (a Serve YAML; tenancy settings under
`applications[0].args.tenancy`, work_dir under `args.work_dir`) or `--database-url URL`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import yaml
from pydantic import ValidationError

from serve_app.errors import APIError
from serve_app.tenancy.config import TenancyConfig
from serve_app.tenancy.service import Tenancy


def load_tenancy_config(config_path: str | None, database_url: str | None,
                        app_name: str | None = None) -> tuple[TenancyConfig, Path]:
    args: dict[str, Any] = {}
    if config_path is not None:
        doc = yaml.safe_load(Path(config_path).read_text()) or {}
        apps = doc.get("applications") or []
        if not apps:
            raise click.BadParameter(f"{config_path} has no `applications:`", param_hint="--config")
        app = apps[0] if app_name is None else next((a for a in apps if a.get("name") == app_name), None)
        if app is None:
            raise click.BadParameter(f"no application named {app_name!r} in {config_path}", param_hint="--app")
        args = app.get("args") or {}
    raw = dict(args.get("tenancy") or {})
    if database_url is not None:
        raw["database_url"] = database_url
    work_dir = Path(os.path.expandvars(os.path.expanduser(str(args.get("work_dir", ".work")))))
    try:
        return TenancyConfig(**raw), work_dir
    except ValidationError as e:
        raise click.BadParameter(str(e), param_hint="--config") from None


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--app", "app_name", default=None, help="Application name in the Serve YAML.")(fn)
    fn = click.option("--database-url", default=None, help="SQLAlchemy URL (overrides the config's).")(fn)
    return click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
                        help="Serve config YAML.")(fn)


@contextmanager
def _tenancy(config_path: str | None, database_url: str | None, app_name: str | None) -> Iterator[Tenancy]:
    cfg, work_dir = load_tenancy_config(config_path, database_url, app_name)
    t = Tenancy(cfg, work_dir=work_dir)
    try:
        yield t
    except APIError as e:
        raise click.ClickException(e.message) from None
    finally:
        t.close()


def _dt(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else "-"


@click.group(help="Create and list tenants.")
def tenants() -> None: ...


@tenants.command("create")
@click.argument("name")
@click.option("--plan", default=None, help="Plan name (default: the config's default_plan).")
@_common
def tenants_create(name: str, plan: str | None, config_path: str | None, database_url: str | None,
                   app_name: str | None) -> None:
    with _tenancy(config_path, database_url, app_name) as t:
        info = t.create_tenant(name, plan)
    click.echo(f"created tenant {info.name} on plan {info.plan}")


@tenants.command("list")
@_common
def tenants_list(config_path: str | None, database_url: str | None, app_name: str | None) -> None:
    with _tenancy(config_path, database_url, app_name) as t:
        rows = t.list_tenants()
    for r in rows:
        click.echo(f"{r.name}\t{r.plan}\t{_dt(r.created_at)}")


@tenants.command("set-plan")
@click.argument("name")
@click.argument("plan")
@_common
def tenants_set_plan(name: str, plan: str, config_path: str | None, database_url: str | None,
                     app_name: str | None) -> None:
    with _tenancy(config_path, database_url, app_name) as t:
        info = t.set_plan(name, plan)
    click.echo(f"tenant {info.name} is now on plan {info.plan}")


@click.group(help="Create, list and revoke API keys.")
def keys() -> None: ...


@keys.command("create")
@click.option("--tenant", required=True)
@click.option("--label", default=None)
@click.option("--expires-in-days", type=click.FloatRange(min=0, min_open=True), default=None)
@_common
def keys_create(tenant: str, label: str | None, expires_in_days: float | None, config_path: str | None,
                database_url: str | None, app_name: str | None) -> None:
    expires = datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days else None
    with _tenancy(config_path, database_url, app_name) as t:
        created = t.create_key(tenant, label=label, expires_at=expires)
    click.echo(f"created key {created.prefix}... for tenant {created.tenant} (expires: {_dt(created.expires_at)})")
    click.echo("It is shown only once; only its hash is stored:")
    click.echo(created.key)  # last line of stdout, for scripts: KEY=$(genserve keys create ... | tail -1)


@keys.command("list")
@click.option("--tenant", required=True)
@_common
def keys_list(tenant: str, config_path: str | None, database_url: str | None, app_name: str | None) -> None:
    with _tenancy(config_path, database_url, app_name) as t:
        rows = t.list_keys(tenant)
    for k in rows:
        state = "revoked" if k.revoked_at else "active"
        click.echo(f"{k.prefix}\t{state}\t{k.label or '-'}\tcreated {_dt(k.created_at)}\texpires {_dt(k.expires_at)}")


@keys.command("revoke")
@click.argument("prefix")
@_common
def keys_revoke(prefix: str, config_path: str | None, database_url: str | None, app_name: str | None) -> None:
    with _tenancy(config_path, database_url, app_name) as t:
        info = t.revoke_key(prefix)
    click.echo(f"revoked key {info.prefix} of tenant {info.tenant} at {_dt(info.revoked_at)}")


@click.command(help="A tenant's usage per day and per model.")
@click.option("--tenant", required=True)
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), default=None, help="YYYY-MM-DD (default: 1st of month).")
@click.option("--until", type=click.DateTime(["%Y-%m-%d"]), default=None, help="YYYY-MM-DD (default: today).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_common
def usage(tenant: str, since: datetime | None, until: datetime | None, as_json: bool, config_path: str | None,
          database_url: str | None, app_name: str | None) -> None:
    with _tenancy(config_path, database_url, app_name) as t:
        report = t.usage(tenant, since.date() if since else None, until.date() if until else None)
    if as_json:
        click.echo(json.dumps(report.model_dump(mode="json"), indent=2))
        return
    click.echo(f"usage of {report.tenant} from {report.since} to {report.until}")
    click.echo("day\trequests\tprompt_tokens\tcompletion_tokens\timages\tgpu_seconds\tcost_usd\tgpu_cost_usd")
    for d in report.days:
        click.echo(f"{d.day}\t{d.requests}\t{d.prompt_tokens}\t{d.completion_tokens}\t{d.images}\t"
                   f"{d.gpu_seconds:.2f}\t{d.cost_usd:.6f}\t{d.gpu_cost_usd:.6f}")
    tot = report.totals
    click.echo(f"total\t{tot.requests}\t{tot.prompt_tokens}\t{tot.completion_tokens}\t{tot.images}\t"
               f"{tot.gpu_seconds:.2f}\t{tot.cost_usd:.6f}\t{tot.gpu_cost_usd:.6f}")
    # Unit figures: the priced amount beside the measured GPU cost ("-": nothing to divide by).
    click.echo("\nmodel\tprice_per_1k_tokens\tgpu_cost_per_1k_tokens\tprice_per_image\tgpu_cost_per_image")
    for m in [*report.by_model, tot]:
        name = getattr(m, "model", "total")
        click.echo(f"{name}\t{_usd(m.price_per_1k_tokens_usd)}\t{_usd(m.gpu_cost_per_1k_tokens_usd)}\t"
                   f"{_usd(m.price_per_image_usd)}\t{_usd(m.gpu_cost_per_image_usd)}")


def _usd(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


@click.group(help="Billing statements from the usage ledger.")
def billing() -> None: ...


@billing.command("statement")
@click.option("--tenant", required=True)
@click.option("--month", required=True, metavar="YYYY-MM", help="Calendar month (UTC), e.g. 2026-12.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Directory of statement-<tenant>-<month>.csv and .json.")
@_common
def billing_statement(tenant: str, month: str, out_dir: Path, config_path: str | None, database_url: str | None,
                      app_name: str | None) -> None:
    """Write TENANT's statement of MONTH as CSV and JSON (same ledger and rates: same bytes)."""
    from serve_app.tenancy import billing as billinglib

    try:
        billinglib.month_bounds(month)
    except APIError as e:
        raise click.BadParameter(e.message, param_hint="--month") from None
    with _tenancy(config_path, database_url, app_name) as t:
        statement = billinglib.build(t.engine, t.config.gpu_cost, tenant, month)
    csv_path, json_path = billinglib.write(statement, out_dir)
    tot = statement.doc["totals"]
    click.echo(f"{tenant} {month}: {tot['requests']} requests, amount ${tot['amount_usd']}, "
               f"GPU cost ${tot['gpu_cost_usd']}{'' if statement.doc['final'] else ' (month not over: preview)'}")
    click.echo(str(csv_path))
    click.echo(str(json_path))
