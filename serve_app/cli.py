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
        from deployments.llm.tiny import build_tiny_llm

        built["llm-tiny"] = build_tiny_llm(out_dir / "llm-tiny")
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


def _curl_hint(base: str, model: str, key: str | None) -> str:
    auth = f" \\\n  -H 'Authorization: Bearer {key}'" if key else ""
    body = json.dumps({"prompt": "a lighthouse at dawn, watercolor --ar 3:2", "model": model, "n": 1})
    return (f"curl -s {base}/v1/images/generations -H 'Content-Type: application/json'{auth} \\\n"
            f"  -d '{body}' \\\n  | python3 -c 'import sys,json,base64; "
            f"open(\"out.png\",\"wb\").write(base64.b64decode(json.load(sys.stdin)[\"data\"][0][\"b64_json\"]))'"
            f" && echo wrote out.png")


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
    model = cfgs[0].image_model_default if cfgs else "sdxl-tiny"
    click.echo(f"\ngenserve is up on {base} ({time.monotonic() - t0:.1f}s). Try:\n")
    click.echo(_curl_hint(base, model, None))
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


if __name__ == "__main__":
    sys.exit(main())
