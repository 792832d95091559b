"""Deploy a Serve config file the way `serve deploy`/`serve run` do, from Python.

`genserve run` and the tests use this so that the committed YAML (its `deployments:` overrides
included) is what actually runs: the controller imports `serve_app.graph:build_app` itself.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from ray import serve
from ray.serve._private import api as _private_api  # what `serve run CONFIG` calls
from ray.serve.config import gRPCOptions
from ray.serve.schema import ServeDeploySchema


def validate_serve_config(doc: dict[str, Any]) -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(doc)


def deploy(doc: dict[str, Any], *, host: str | None = None, port: int | None = None) -> ServeDeploySchema:
    """Start Serve on the connected Ray cluster (if needed) and submit the config."""
    doc = copy.deepcopy(doc)
    http = doc.setdefault("http_options", {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    _default_public_base_url(doc)
    schema = validate_serve_config(doc)
    client = _private_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    client.deploy_apps(schema, _blocking=False)
    return schema


def _default_public_base_url(doc: dict[str, Any]) -> None:
    """genserve apps without `public_base_url` get the address Serve is told to bind: result URLs come
    from configuration, never from a request's Host header (a wildcard bind means this machine)."""
    from serve_app.config_check import GRAPH_IMPORT_PATH

    http = doc.get("http_options") or {}
    host = str(http.get("host") or "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    host = f"[{host}]" if ":" in host else host
    for app in doc.get("applications") or []:
        if app.get("import_path") == GRAPH_IMPORT_PATH:
            args = app.setdefault("args", {})
            prefix = str(app.get("route_prefix") or "/").rstrip("/")
            args.setdefault("public_base_url", f"http://{host}:{http.get('port') or 8000}{prefix}")


def wait_running(app_name: str, timeout_s: float = 300.0, poll_s: float = 0.5) -> None:
    """Block until the application is RUNNING; raise with Serve's message if it fails."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        if app is not None:
            last = app
            state = str(getattr(app.status, "value", app.status))
            if state == "RUNNING":
                return
            if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                details = {n: d.message for n, d in app.deployments.items() if d.message}
                raise RuntimeError(f"application {app_name!r} is {state}: {app.message or details}")
        time.sleep(poll_s)
    raise TimeoutError(f"application {app_name!r} not RUNNING after {timeout_s:.0f}s "
                       f"(last status: {getattr(last, 'status', None)})")
