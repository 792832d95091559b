"""GPU cost from the ledger: `tenancy.gpu_cost` rates, cost per 1k tokens and per image in usage
reports and /v1/usage, and `genserve billing statement` (CSV + JSON, same bytes on a rerun), on
SQLite and Postgres."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner
from fastapi.testclient import TestClient
from pydantic import ValidationError
from servers import db_url, make_tenancy, postgres_server, tenancy_app  # noqa: F401  (fixtures)

from serve_app.tenancy.cli import billing, usage
from serve_app.tenancy.limits import Grant, window_start
from serve_app.tenancy.service import Admission

genserve = click.Group("genserve", commands=[billing, usage])
# $3.60 per GPU-hour = $0.001 per GPU-second (llm); $7.20 = $0.002 (sdxl).
GPU_COST = {"usd_per_gpu_hour": {"llm": 3.6, "sdxl": 7.2}, "default_usd_per_gpu_hour": 0.0}
PRICES = {"per_1k_prompt_tokens": 1.0, "per_1k_completion_tokens": 2.0, "per_image": 0.01, "per_gpu_second": 0.0}


def _record(tenancy, tenant: str, when: str, *, route: str, model: str,  # type: ignore[no-untyped-def]
            status: str = "ok", **usage: float) -> None:
    """One settled request started at `when` (UTC), through the real settle path."""
    started = datetime.fromisoformat(when).replace(tzinfo=UTC).timestamp()
    ctx = tenancy.authenticate_sync(tenancy._test_keys[tenant])
    grant = Grant(window_start=window_start(started, 60), window_s=60)
    adm = Admission(tenancy, ctx, route, model, grant, None, started)
    adm.add(**usage)  # type: ignore[arg-type]
    adm.settle_sync(status)


def _ledger(db: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    tenancy = make_tenancy(db, tmp_path, prices=PRICES, gpu_cost=GPU_COST)
    tenancy._test_keys = {}
    for name in ("acme", "other"):
        tenancy.create_tenant(name, "pro")
        tenancy._test_keys[name] = tenancy.create_key(name).key
    r = _record
    r(tenancy, "acme", "2026-11-03T10:00:00", route="chat", model="llm", prompt_tokens=100, completion_tokens=400,
      gpu_seconds=2.0)
    r(tenancy, "acme", "2026-11-03T23:59:59", route="completions", model="llm", prompt_tokens=50,
      completion_tokens=450, gpu_seconds=0.5, status="disconnected")
    r(tenancy, "acme", "2026-11-04T08:00:00", route="chat", model="llm", prompt_tokens=0, completion_tokens=0,
      gpu_seconds=0.5)
    r(tenancy, "acme", "2026-11-04T09:00:00", route="images", model="sdxl", images=3, gpu_seconds=2.4)
    r(tenancy, "acme", "2026-11-30T23:00:00", route="jobs", model="sdxl", images=1, gpu_seconds=1.2)
    r(tenancy, "acme", "2026-12-01T00:00:00", route="chat", model="llm", completion_tokens=999, gpu_seconds=9.0)
    r(tenancy, "other", "2026-11-05T00:00:00", route="chat", model="llm", completion_tokens=999, gpu_seconds=9.0)
    return tenancy


def _serve_yaml(tmp_path: Path, db: str) -> Path:
    doc = {"applications": [{"name": "genserve", "import_path": "serve_app.graph:build_app",
                             "args": {"work_dir": str(tmp_path / "work"),
                                      "tenancy": {"database_url": db, "key_pepper": "pepper", "prices": PRICES,
                                                  "gpu_cost": GPU_COST}}}]}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_usage_report_gives_gpu_cost_per_1k_tokens_and_per_image(db_url: str, tmp_path: Path) -> None:  # noqa: F811
    tenancy = _ledger(db_url, tmp_path)
    try:
        from datetime import date

        report = tenancy.usage("acme", date(2026, 11, 1), date(2026, 11, 30))
        tot = report.totals
        assert (tot.requests, tot.images, tot.total_tokens) == (5, 4, 1000)
        assert tot.gpu_seconds == pytest.approx(6.6)
        # llm: 3.0 GPU-s × $0.001 over 1000 tokens; sdxl: 3.6 GPU-s × $0.002 over 4 images.
        assert tot.gpu_cost_usd == pytest.approx(0.003 + 0.0072)
        assert tot.gpu_cost_per_1k_tokens_usd == pytest.approx(0.003)
        assert tot.gpu_cost_per_image_usd == pytest.approx(0.0018)
        # Priced: 150 prompt × $1/1k + 850 completion × $2/1k over 1000 tokens; $0.01 per image.
        assert tot.price_per_1k_tokens_usd == pytest.approx(1.85)
        assert tot.price_per_image_usd == pytest.approx(0.01)
        by_model = {m.model: m for m in report.by_model}
        assert by_model["llm"].gpu_cost_per_image_usd is None and by_model["sdxl"].gpu_cost_per_1k_tokens_usd is None
        day3 = next(d for d in report.days if d.day == date(2026, 11, 3))
        assert day3.gpu_cost_usd == pytest.approx(0.0025) and day3.gpu_cost_per_image_usd is None
        out = CliRunner().invoke(genserve, ["usage", "--tenant", "acme", "--since", "2026-11-01", "--until",
                                            "2026-11-30", "--config", str(_serve_yaml(tmp_path, db_url))])
        assert out.exit_code == 0, out.output
        assert "\ntotal\t5\t150\t850\t4\t6.60\t" in out.output and "\t0.010200\n" in out.output
        assert "\ntotal\t1.850000\t0.003000\t0.010000\t0.001800\n" in out.output
        assert "\nllm\t1.850000\t0.003000\t-\t-\n" in out.output
    finally:
        tenancy.close()


def test_v1_usage_shows_unit_costs_beside_the_priced_amount(tmp_path: Path) -> None:
    tenancy = make_tenancy(f"sqlite:///{tmp_path / 'u.db'}", tmp_path, prices=PRICES, gpu_cost=GPU_COST)
    tenancy.create_tenant("acme", "pro")
    key = tenancy.create_key("acme").key
    ctx = tenancy.authenticate_sync(key)
    tenancy.record_usage(ctx, route="chat", model="llm", prompt_tokens=200, completion_tokens=300, gpu_seconds=1.5)
    with TestClient(tenancy_app(tenancy)) as client:
        today = client.get("/v1/usage", headers={"X-API-Key": key}).json()["today"]
    tenancy.close()
    assert today["cost_usd"] == pytest.approx(0.8)
    assert today["gpu_cost_usd"] == pytest.approx(0.0015)
    assert today["gpu_cost_per_1k_tokens_usd"] == pytest.approx(0.003)
    assert today["price_per_1k_tokens_usd"] == pytest.approx(1.6)
    assert today["gpu_cost_per_image_usd"] is None and today["price_per_image_usd"] is None


def test_statement_is_reproducible_and_adds_up(db_url: str, tmp_path: Path) -> None:  # noqa: F811
    tenancy = _ledger(db_url, tmp_path)
    tenancy.close()
    cfg = str(_serve_yaml(tmp_path, db_url))
    out = tmp_path / "statements"
    args = ["billing", "statement", "--tenant", "acme", "--month", "2026-11", "--out", str(out), "--config", cfg]
    first = CliRunner().invoke(genserve, args)
    assert first.exit_code == 0, first.output
    csv_path, json_path = out / "statement-acme-2026-11.csv", out / "statement-acme-2026-11.json"
    assert str(csv_path) in first.output and str(json_path) in first.output
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (csv_path, json_path)}
    again = CliRunner().invoke(genserve, args)
    assert again.exit_code == 0, again.output
    for p, (data, mtime) in before.items():  # same bytes, and not even rewritten
        assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime
    doc = json.loads(json_path.read_text())
    assert doc["final"] is True and doc["period"] == {"first_day": "2026-11-01", "last_day": "2026-11-30"}
    assert doc["gpu_usd_per_hour"] == {"llm": "3.6", "sdxl": "7.2"}
    lines = [(x["day"], x["model"], x["route"]) for x in doc["lines"]]
    assert lines == [("2026-11-03", "llm", "chat"), ("2026-11-03", "llm", "completions"),
                     ("2026-11-04", "llm", "chat"), ("2026-11-04", "sdxl", "images"), ("2026-11-30", "sdxl", "jobs")]
    tot = doc["totals"]
    assert (tot["requests"], tot["failed_requests"], tot["images"]) == (5, 1, 4)
    assert (tot["gpu_seconds"], tot["gpu_cost_usd"]) == ("6.600000", "0.010200")
    assert tot["amount_usd"] == "1.890000"  # 0.9 + 0.95 (1000 tokens) + 0.04 (4 images)
    models = {m["model"]: m for m in doc["by_model"]}
    assert models["llm"]["per_1k_tokens"] == {"amount_usd": "1.850000", "gpu_cost_usd": "0.003000"}
    assert models["sdxl"]["per_image"] == {"amount_usd": "0.010000", "gpu_cost_usd": "0.001800"}
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert rows[-1]["day"] == "total" and len(rows) == 6
    for col in ("requests", "images", "prompt_tokens", "completion_tokens"):
        assert sum(int(r[col]) for r in rows[:-1]) == int(rows[-1][col])
    for col in ("gpu_seconds", "amount_usd", "gpu_cost_usd"):
        assert sum(round(float(r[col]) * 1e6) for r in rows[:-1]) == round(float(rows[-1][col]) * 1e6)
    # A new ledger row of that month changes the statement; the rerun replaces it.
    tenancy = make_tenancy(db_url, tmp_path, prices=PRICES, gpu_cost=GPU_COST)
    tenancy._test_keys = {"acme": tenancy.create_key("acme").key}
    _record(tenancy, "acme", "2026-11-20T12:00:00", route="chat", model="llm", completion_tokens=10, gpu_seconds=0.1)
    tenancy.close()
    assert CliRunner().invoke(genserve, args).exit_code == 0
    assert json.loads(json_path.read_text())["totals"]["requests"] == 6


def test_statement_input_errors(tmp_path: Path) -> None:
    cfg = str(_serve_yaml(tmp_path, f"sqlite:///{tmp_path / 's.db'}"))
    run = CliRunner().invoke
    bad = run(genserve, ["billing", "statement", "--tenant", "acme", "--month", "2026-13", "--config", cfg])
    assert bad.exit_code == 2 and "month must be YYYY-MM" in bad.output
    missing = run(genserve, ["billing", "statement", "--tenant", "nobody", "--month", "2026-11", "--config", cfg,
                             "--out", str(tmp_path)])
    assert missing.exit_code == 1 and "No tenant named 'nobody'" in missing.output
    assert not list(tmp_path.glob("statement-*"))


def test_gpu_cost_config_is_typed_and_names_real_models() -> None:
    from serve_app.config import AppConfig, DiffusionModelConfig
    from serve_app.tenancy.config import TenancyConfig

    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        TenancyConfig(gpu_cost={"usd_per_gpu_hour": {"x": -1}})
    tiny = [DiffusionModelConfig(name="tiny", family="sdxl", model="none", aliases=["t"])]
    AppConfig(diffusion_models=tiny, tenancy={"gpu_cost": {"usd_per_gpu_hour": {"tiny": 2.5}}})
    with pytest.raises(ValidationError, match=r"unknown model\(s\) \['t'\]"):
        AppConfig(diffusion_models=tiny, tenancy={"gpu_cost": {"usd_per_gpu_hour": {"t": 2.5}}})
