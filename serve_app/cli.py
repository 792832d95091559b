"""The `genserve` command line."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import click
import yaml


@click.group()
def main() -> None:
    """genserve: image generation and LLM chat on a Ray Serve graph."""


def _mount_feature_commands() -> None:
    """Each feature owns its commands; the CLI only gathers them."""
    from clients.telegram.cli import bot
    from serve_app.adapters.cli import adapters
    from serve_app.bench_cli import bench
    from serve_app.library.cli import templates
    from serve_app.telemetry.status import status
    from serve_app.tenancy.cli import billing, keys, tenants, usage

    for cmd in (tenants, keys, usage, billing, templates, status, bot, bench, adapters):
        main.add_command(cmd)


@main.group()
def models() -> None:
    """Model utilities."""


@models.command("build-tiny")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path(".work/models"), show_default=True)
def build_tiny(out_dir: Path) -> None:
    """Build tiny random-weight models (SDXL-family, Würstchen, LLM) for CPU runs and tests."""
    from deployments.diffusion.tiny import build_all_tiny

    built = build_all_tiny(out_dir)
    try:
        from deployments.llm.tiny import build_tiny_llm, build_tiny_llm_adapters

        built["llm-tiny"] = build_tiny_llm(out_dir / "llm-tiny")
    except ImportError:
        pass
    else:
        try:  # random LoRA adapters of the tiny LLM (needs peft)
            for name, path in build_tiny_llm_adapters(out_dir / "llm-tiny-lora", built["llm-tiny"]).items():
                built[f"llm-tiny-lora/{name}"] = path
        except ImportError:
            pass
    for name, path in built.items():
        click.echo(f"{name}: {path}")


@main.group()
def config() -> None:
    """Serve config files."""


@config.command("check")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
def config_check(path: Path) -> None:
    """Validate a Serve config (Ray's schema + genserve's typed args + GPU fractions)."""
    from serve_app.config_check import check_file

    try:
        cfgs = check_file(path)
    except Exception as e:  # noqa: BLE001 - shown to the user as a validation failure
        raise click.ClickException(f"{path}: {e}") from None
    for c in cfgs:
        click.echo(f"{path}: ok ({len(c.diffusion_models)} image model(s), {len(c.llm_models)} chat model(s))")


def _curl_hint(base: str, model: str, key_file: Path) -> str:
    auth = f" \\\n  -H \"Authorization: Bearer $(cat {key_file})\""
    body = json.dumps({"prompt": "a lighthouse at dawn, watercolor --ar 3:2", "model": model, "n": 1})
    return (f"curl -s {base}/v1/images/generations -H 'Content-Type: application/json'{auth} \\\n"
            f"  -d '{body}' \\\n  | python3 -c 'import sys,json,base64; "
            f"open(\"out.png\",\"wb\").write(base64.b64decode(json.load(sys.stdin)[\"data\"][0][\"b64_json\"]))'"
            f" && echo wrote out.png")


def _bootstrap_local_tenant(cfg) -> str | None:
    """Create the quick start's `local` tenant before the ingress starts, to print its key once."""
    if not cfg.tenancy.local_tenant.enabled:
        return None
    from serve_app.tenancy import Tenancy, ensure_local_tenant

    tenancy = Tenancy(cfg.tenancy, work_dir=cfg.work_dir)
    try:
        return ensure_local_tenant(tenancy)
    finally:
        tenancy.close()


@main.command()
@click.option("--config", "config_path", type=click.Path(exists=True, path_type=Path),
              default=Path("configs/local.yaml"), show_default=True)
@click.option("--host", default=None, help="Override http_options.host.")
@click.option("--port", type=int, default=None, help="Override http_options.port.")
@click.option("--address", default=None, help="Connect to a running Ray cluster instead of starting one.")
@click.option("--num-cpus", type=int, default=None, help="Logical CPUs for a local cluster.")
@click.option("--dashboard/--no-dashboard", default=False, show_default=True)
def run(config_path: Path, host: str | None, port: int | None, address: str | None, num_cpus: int | None,
        dashboard: bool) -> None:
    """Start a local Ray cluster and deploy CONFIG on it, in the foreground (Ctrl-C stops)."""
    import ray
    from ray import serve

    from serve_app import launcher
    from serve_app.config_check import check_document

    doc = yaml.safe_load(config_path.read_text())
    os.environ.setdefault("GENSERVE_WORK", str(Path(".work").resolve()))
    try:
        cfgs = check_document(doc)
    except Exception as e:  # noqa: BLE001
        raise click.ClickException(f"{config_path}: {e}") from None
    Path(os.environ["GENSERVE_WORK"]).mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    new_key = _bootstrap_local_tenant(cfgs[0]) if cfgs else None
    if address:
        ray.init(address=address)
    else:
        # Logical CPUs: tiny CPU models oversubscribe the cores on purpose (replicas mostly wait).
        ray.init(num_cpus=num_cpus or max(8, os.cpu_count() or 2), include_dashboard=dashboard,
                 runtime_env={"env_vars": {"GENSERVE_WORK": os.environ["GENSERVE_WORK"]}})
    schema = launcher.deploy(doc, host=host, port=port)
    app_name = schema.applications[0].name
    click.echo(f"deploying {app_name!r} from {config_path} ...")
    launcher.wait_running(app_name, timeout_s=600)
    http = schema.http_options
    base = f"http://{http.host}:{http.port}"
    cfg = cfgs[0]
    key_file = cfg.tenancy.resolved_key_file(cfg.work_dir)
    if new_key:
        click.echo(f"\nCreated tenant {cfg.tenancy.local_tenant.name!r}; its API key (shown once, kept in {key_file}):"
                   f"\n  {new_key}")
    click.echo(f"\ngenserve is up on {base} ({time.monotonic() - t0:.1f}s). Try:\n")
    click.echo(_curl_hint(base, cfg.image_model_default, key_file))
    click.echo("\nCtrl-C stops it.")
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while not stop["now"]:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    click.echo("shutting down ...")
    serve.shutdown()
    ray.shutdown()


@main.group()
def kuberay() -> None:
    """KubeRay manifests (kuberay/)."""


@kuberay.command("render")
@click.option("--config", "config_path", type=click.Path(exists=True, path_type=Path),
              default=Path("configs/serve.yaml"), show_default=True, help="Serve config copied into serveConfigV2.")
@click.option("--template", "template_path", type=click.Path(exists=True, path_type=Path),
              default=Path("kuberay/rayservice.template.yaml"), show_default=True)
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=Path("kuberay/rayservice.yaml"),
              show_default=True)
@click.option("--image", default=None, metavar="REF",
              help="Container image of every Ray pod (registry/path:tag or @sha256:...). "
                   "Default: serve_app.kuberay.DEFAULT_IMAGE, what `make image` tags.")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if OUT differs from a fresh render.")
def kuberay_render(config_path: Path, template_path: Path, out_path: Path, image: str | None, check: bool) -> None:
    """Render the RayService with CONFIG as its serveConfigV2 and IMAGE in its pods (one source of truth)."""
    from serve_app.kuberay import DEFAULT_IMAGE, render_files

    image = DEFAULT_IMAGE if image is None else image
    try:
        text = render_files(template_path, config_path, image)
    except Exception as e:  # noqa: BLE001 - shown to the user as a render failure
        raise click.ClickException(f"{template_path} + {config_path}: {e}") from None
    if check:
        current = out_path.read_text() if out_path.exists() else None
        if current != text:
            click.echo(f"{out_path} is stale: run `genserve kuberay render --config {config_path} "
                       f"--out {out_path}`", err=True)
            sys.exit(1)
        click.echo(f"{out_path}: up to date")
        return
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    click.echo(f"wrote {out_path} (serveConfigV2 from {config_path}, image {image})")


@kuberay.command("rules")
@click.option("--rules", "rules_path", type=click.Path(exists=True, path_type=Path),
              default=Path("configs/prometheus/alerts.yaml"), show_default=True, help="Prometheus rule file.")
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=Path("kuberay/prometheusrule.yaml"),
              show_default=True)
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if OUT differs from a fresh render.")
def kuberay_rules(rules_path: Path, out_path: Path, check: bool) -> None:
    """Render the alert rules as a PrometheusRule (Prometheus Operator) for the kustomization."""
    from serve_app.kuberay import render_prometheus_rule

    try:
        text = render_prometheus_rule(rules_path.read_text(), str(rules_path))
    except Exception as e:  # noqa: BLE001 - shown to the user as a render failure
        raise click.ClickException(f"{rules_path}: {e}") from None
    if check:
        if not out_path.exists() or out_path.read_text() != text:
            click.echo(f"{out_path} is stale: run `genserve kuberay rules`", err=True)
            sys.exit(1)
        click.echo(f"{out_path}: up to date")
        return
    out_path.write_text(text)
    click.echo(f"wrote {out_path} (PrometheusRule from {rules_path})")


_mount_feature_commands()

if __name__ == "__main__":
    sys.exit(main())
