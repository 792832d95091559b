"""`genserve tenants|keys|usage` against a real database, from a Serve YAML or --database-url."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import yaml
from click.testing import CliRunner
from servers import db_url, make_tenancy, postgres_server  # noqa: F401  (fixtures)

from serve_app.tenancy.cli import keys, tenants, usage

genserve = click.Group("genserve", commands=[tenants, keys, usage])  # as the lead's CLI mounts them


def _serve_yaml(tmp_path: Path, db: str) -> Path:
    doc = {"applications": [{"name": "genserve", "import_path": "serve_app.graph:build_app",
                             "args": {"work_dir": str(tmp_path / "work"),
                                      "tenancy": {"database_url": db, "key_pepper": "pep",
                                                  "plans": [{"name": "basic"}, {"name": "max", "priority": 9}],
                                                  "default_plan": "basic"}}}]}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_cli_round_trip_with_serve_yaml(db_url: str, tmp_path: Path) -> None:  # noqa: F811
    cfg = _serve_yaml(tmp_path, db_url)
    run = CliRunner().invoke
    r = run(genserve, ["tenants", "create", "acme", "--plan", "max", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert run(genserve, ["tenants", "create", "acme", "--config", str(cfg)]).exit_code == 1
    bad = run(genserve, ["tenants", "create", "other", "--plan", "gold", "--config", str(cfg)])
    assert bad.exit_code == 1 and "Unknown plan 'gold'" in bad.output
    assert "acme\tmax" in run(genserve, ["tenants", "list", "--config", str(cfg)]).output
    r = run(genserve, ["keys", "create", "--tenant", "acme", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    key = r.stdout.strip().splitlines()[-1]
    assert key.startswith("gsk_")
    tenancy = make_tenancy(db_url, tmp_path, key_pepper="pep", plans=[{"name": "basic"}, {"name": "max"}])
    ctx = tenancy.authenticate_sync(key)
    assert (ctx.tenant, ctx.plan.name) == ("acme", "max")
    adm = tenancy.admit_sync(ctx, route="images", model="tiny", images=2)
    adm.add(images=2, gpu_seconds=1.5)
    adm.settle_sync()
    report = run(genserve, ["usage", "--tenant", "acme", "--since", "2000-01-01", "--config", str(cfg)])
    assert report.exit_code == 0 and "\ntotal\t1\t0\t0\t2\t1.50\t0.020000" in report.output
    assert key not in report.output
    assert run(genserve, ["usage", "--tenant", "nobody", "--config", str(cfg)]).exit_code == 1
    r = run(genserve, ["keys", "revoke", key[:12], "--config", str(cfg)])
    assert r.exit_code == 0 and key[:12] in r.output and key not in r.output
    assert "revoked" in run(genserve, ["keys", "list", "--tenant", "acme", "--config", str(cfg)]).output
    tenancy.close()


def test_keys_create_prints_the_key_last_in_a_real_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    code = ("import click; from serve_app.tenancy.cli import keys, tenants, usage; "
            "click.Group('genserve', commands=[tenants, keys, usage])()")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, *args, "--database-url", url], capture_output=True,
                              text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
                              env={"PATH": "/usr/bin:/bin", "GENSERVE_KEY_PEPPER": "x"})

    assert cli("tenants", "create", "acme").returncode == 0
    out = cli("keys", "create", "--tenant", "acme", "--expires-in-days", "30")
    assert out.returncode == 0, out.stderr
    key = out.stdout.splitlines()[-1]
    assert key.startswith("gsk_") and len(key) == 47
    assert key not in out.stderr
    missing = cli("keys", "create", "--tenant", "nobody")
    assert missing.returncode == 1 and "No tenant named 'nobody'" in missing.stderr
