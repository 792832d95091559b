"""`genserve templates ...` against a real database, configured by a Serve YAML."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import yaml
from click.testing import CliRunner
from servers import db_url, postgres_server  # noqa: F401  (fixtures)

from serve_app.library.cli import SEED_FILE, templates
from serve_app.tenancy.cli import tenants

genserve = click.Group("genserve", commands=[templates, tenants])


def _serve_yaml(tmp_path: Path, db: str) -> Path:
    args = {"work_dir": str(tmp_path / "work"), "tenancy": {"database_url": db},
            "diffusion_models": [{"name": "tiny", "family": "sdxl", "model": "none", "aliases": ["v6"],
                                  "native_resolution": 64, "size_multiple": 8, "min_side": 32, "max_side": 128,
                                  "default_steps": 2, "max_steps": 8}],
            "templates": [{"name": "cfg_tpl", "template": "config {thing}", "defaults": "--ar 2:1"}]}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"name": "genserve", "import_path": "x:y", "args": args}]}))
    return path


def test_add_list_show_render_seed(db_url: str, tmp_path: Path) -> None:  # noqa: F811
    cfg = str(_serve_yaml(tmp_path, db_url))
    run = lambda *a: CliRunner().invoke(genserve, [*a, "--config", cfg])  # noqa: E731
    r = run("templates", "add", "shot", "--template", "{product} on {surface}", "--category", "product",
            "--tag", "studio", "--tag", "commercial", "--defaults", "--ar 1:1 --s 250")
    assert r.exit_code == 0 and "saved shot version 1" in r.output, r.output
    r = run("templates", "add", "shot", "--template", "{product} on dark {surface}", "--category", "product")
    assert "version 2" in r.output
    bad = run("templates", "add", "x", "--template", "{0.__init__}")
    assert bad.exit_code == 1 and "stray brace" in bad.output
    assert "shot\tv2\tproduct\t-\t-\tshared" in run("templates", "list").output
    assert run("templates", "list", "--tag", "studio").output == ""  # v2 has no tags
    shown = run("templates", "show", "shot", "--version", "1").output
    assert "version: 1" in shown and "tags: studio, commercial" in shown and "defaults: --ar 1:1 --s 250" in shown
    r = run("templates", "render", "shot", "--version", "1", "--var", "product=premium watch",
            "--var", "surface=marble", "--seed", "5")
    assert r.exit_code == 0, r.output
    first, rest = r.output.split("\n", 1)
    assert first == "premium watch on marble"
    info = json.loads(rest)
    assert info["seeds"] == [5] and info["params"]["stylize"] == 250 and info["width"] == info["height"]
    assert info["template"] == {"name": "shot", "version": 1, "source": "shared"}
    missing = run("templates", "render", "shot", "--var", "product=x")
    assert missing.exit_code == 1 and "needs variable 'surface'" in missing.output
    r = run("templates", "render", "cfg_tpl", "--var", "thing=a kite")  # config templates still render
    assert r.exit_code == 0 and r.output.startswith("config a kite\n")
    # Seed: every example loads, and a second run changes nothing.
    n = len(yaml.safe_load(SEED_FILE.read_text())["templates"])
    assert f"seeded {n} template(s); 0 already" in run("templates", "seed").output
    assert f"seeded 0 template(s); {n} already" in run("templates", "seed").output
    listed = run("templates", "list", "--category", "architecture").output.splitlines()
    assert [line.split("\t")[0] for line in listed] == ["arch_exterior", "arch_interior"]
    for spec in yaml.safe_load(SEED_FILE.read_text())["templates"]:  # each example renders with its defaults
        name = spec["name"]
        args = [a for v in re.findall(r"\{(\w+)\}", spec["template"]) for a in ("--var", f"{v}=x")]
        assert run("templates", "render", name, *args).exit_code == 0, name
    # Per-tenant templates.
    assert run("tenants", "create", "acme").exit_code == 0
    assert "version 1" in run("templates", "add", "mine", "--template", "t {a}", "--tenant", "acme").output
    assert "mine" not in run("templates", "list").output
    assert "mine\tv1" in run("templates", "list", "--tenant", "acme").output
    assert run("templates", "list", "--tenant", "nobody").exit_code == 1
    assert "deleted 1 version(s)" in run("templates", "delete", "mine", "--tenant", "acme").output
