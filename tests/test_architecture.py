"""The layering the design relies on: `deployments/` (the model replicas) and `telemetry/` know
nothing about the HTTP application or tenants. They import nothing from `serve_app/` and none of
the ingress's libraries, so a model replica neither loads them (about a second of imports per LLM
replica before) nor depends on them; each deployment's contract is its own config module."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The application and the libraries only the ingress side needs (HTTP, tenancy DB, storage, Redis).
FORBIDDEN = frozenset({"serve_app", "fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "psycopg",
                       "boto3", "botocore", "redis"})
MODEL_SIDE = ("deployments", "telemetry")


def imported_modules(path: Path) -> set[str]:
    """Absolute modules a source file imports (at any depth: lazy imports inside functions count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", MODEL_SIDE)
def test_model_side_imports_nothing_of_the_app(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no sources under {package}/"
    offending = {f"{f.relative_to(REPO)}: {m}" for f in files for m in imported_modules(f)
                 if m.split(".")[0] in FORBIDDEN}
    assert not offending, "model-side code imports the application or its libraries:\n" + "\n".join(sorted(offending))


def test_an_llm_replica_module_loads_nothing_of_the_app() -> None:
    """In a fresh interpreter, what the deployment modules add to what Ray Serve loads anyway
    (Ray Serve itself imports fastapi and starlette for its proxy)."""
    code = f"""
import json, sys
forbidden = {sorted(FORBIDDEN)!r}
loaded = lambda: sorted(m for m in forbidden if m in sys.modules)
import ray.serve
by_ray = loaded()
import deployments.llm.deployment, deployments.llm.config
import deployments.diffusion.deployment, deployments.diffusion.config
print(json.dumps({{"by_ray": by_ray, "after": loaded()}}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    added = sorted(set(seen["after"]) - set(seen["by_ray"]))
    assert added == [], f"importing the deployments loaded {added}"
    assert not {"serve_app", "sqlalchemy", "boto3", "redis"} & set(seen["after"]), seen

