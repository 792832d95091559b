"""A tenant's monthly statement from the usage ledger, as CSV and JSON files.

Reproducible: the same ledger and rates give the same bytes. Nothing in it depends on when it was
made except `final` (false while the month is still running); lines are sorted; GPU-seconds are
summed in SQL as whole microseconds (integer sums: exact and independent of row order, unlike a
float SUM); money is Decimal, rounded once per line to the micro-dollar (ROUND_HALF_UP), and
totals are the sums of the printed lines, so the CSV adds up. Idempotent: a file whose content
would not change is left untouched; a changed one is replaced atomically.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from sqlalchemy import BigInteger, Engine, case, cast, func, select

from serve_app.errors import bad_request
from serve_app.tenancy import store
from serve_app.tenancy.config import GpuCostConfig
from serve_app.tenancy.db import read_tx
from serve_app.tenancy.models import UsageEvent

MONTH = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
MICRO = Decimal("0.000001")
COLUMNS = ("day", "model", "route", "requests", "failed_requests", "prompt_tokens", "completion_tokens", "images",
           "gpu_seconds", "amount_usd", "gpu_cost_usd")


def month_bounds(month: str) -> tuple[date, date]:
    """('2026-12') -> (2026-12-01, 2026-12-31); a 400 naming `month` if it is not YYYY-MM."""
    m = MONTH.fullmatch(month)
    if m is None:
        raise bad_request(f"month must be YYYY-MM (e.g. 2026-12), got {month!r}", param="month",
                          code="invalid_month")
    year, mon = int(m.group(1)), int(m.group(2))
    first = date(year, mon, 1)
    nxt = date(year + (mon == 12), mon % 12 + 1, 1)
    return first, date.fromordinal(nxt.toordinal() - 1)


def _usd(micros: int) -> Decimal:
    return (Decimal(micros) / 1_000_000).quantize(MICRO)


def _gpu_cost(gpu_us: int, usd_per_hour: float) -> Decimal:
    return (Decimal(gpu_us) * Decimal(str(usd_per_hour)) / Decimal(3_600_000_000)).quantize(MICRO, ROUND_HALF_UP)


@dataclass(frozen=True)
class Statement:
    doc: dict  # the JSON document

    def json_text(self) -> str:
        return json.dumps(self.doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    def csv_text(self) -> str:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(COLUMNS)
        for line in [*self.doc["lines"], {**self.doc["totals"], "day": "total", "model": "", "route": ""}]:
            w.writerow([line[c] for c in COLUMNS])
        return out.getvalue()


def build(engine: Engine, gpu_cost: GpuCostConfig, tenant: str, month: str, *, today: date | None = None) -> Statement:
    first, last = month_bounds(month)
    e = UsageEvent
    failed = func.sum(case((e.status != "ok", 1), else_=0))  # error or disconnected (still billed as used)
    with read_tx(engine) as conn:
        t = store._get_tenant(conn, tenant)
        rows = conn.execute(
            select(e.day, e.model, e.route, func.count(), failed, func.sum(e.prompt_tokens),
                   func.sum(e.completion_tokens), func.sum(e.images),
                   func.sum(cast(func.round(e.gpu_seconds * 1_000_000), BigInteger)), func.sum(e.cost_micros))
            .where(e.tenant_id == t.id, e.day >= first, e.day <= last)
            .group_by(e.day, e.model, e.route).order_by(e.day, e.model, e.route)).all()
    lines, rates = [], {}
    for day, model, route, n, n_failed, p, c, images, gpu_us, micros in rows:
        rate = gpu_cost.rate(model)
        rates[model] = str(rate)
        gpu_us = int(gpu_us or 0)
        lines.append({
            "day": day.isoformat(), "model": model, "route": route, "requests": int(n),
            "failed_requests": int(n_failed or 0), "prompt_tokens": int(p or 0), "completion_tokens": int(c or 0),
            "images": int(images or 0), "gpu_seconds": str((Decimal(gpu_us) / 1_000_000).quantize(MICRO)),
            "amount_usd": str(_usd(int(micros or 0))), "gpu_cost_usd": str(_gpu_cost(gpu_us, rate)),
        })
    today = today or datetime.now(UTC).date()
    doc = {
        "object": "billing.statement",
        "tenant": t.name,
        "month": month,
        "period": {"first_day": first.isoformat(), "last_day": last.isoformat()},
        "final": today > last,  # false: the month is still running, later runs will add to it
        "currency": "USD",
        "gpu_usd_per_hour": dict(sorted(rates.items())),
        "lines": lines,
        "by_model": _by_model(lines),
        "totals": _sum(lines),
    }
    return Statement(doc)


def _sum(lines: list[dict]) -> dict:
    ints = ("requests", "failed_requests", "prompt_tokens", "completion_tokens", "images")
    decs = ("gpu_seconds", "amount_usd", "gpu_cost_usd")
    out: dict = {k: sum(line[k] for line in lines) for k in ints}
    out |= {k: str(sum((Decimal(line[k]) for line in lines), Decimal(0)).quantize(MICRO)) for k in decs}
    return out


def _per(amount: str, count: int, scale: int = 1) -> str | None:
    return str((Decimal(amount) * scale / count).quantize(MICRO, ROUND_HALF_UP)) if count else None


def _by_model(lines: list[dict]) -> list[dict]:
    """Per model: the sums, and per 1k tokens (token models) or per image (image models)."""
    out = []
    for model in sorted({line["model"] for line in lines}):
        tot = _sum([line for line in lines if line["model"] == model])
        tokens = tot["prompt_tokens"] + tot["completion_tokens"]
        unit: dict[str, dict[str, str | None] | None] = {"per_image": None, "per_1k_tokens": None}
        if tot["images"]:
            unit["per_image"] = {"amount_usd": _per(tot["amount_usd"], tot["images"]),
                                 "gpu_cost_usd": _per(tot["gpu_cost_usd"], tot["images"])}
        elif tokens:
            unit["per_1k_tokens"] = {"amount_usd": _per(tot["amount_usd"], tokens, 1000),
                                     "gpu_cost_usd": _per(tot["gpu_cost_usd"], tokens, 1000)}
        out.append({"model": model, **tot, **unit})
    return out


def _write_if_changed(path: Path, text: str) -> bool:
    data = text.encode()
    if path.exists() and path.read_bytes() == data:
        return False
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def write(statement: Statement, out_dir: Path) -> tuple[Path, Path]:
    """`statement-<tenant>-<month>.csv` and `.json` in `out_dir` (created if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"statement-{statement.doc['tenant']}-{statement.doc['month']}"
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    _write_if_changed(csv_path, statement.csv_text())
    _write_if_changed(json_path, statement.json_text())
    return csv_path, json_path
