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



def module_graph(package: str) -> dict[str, set[str]]:
    """Each module under `package` -> the modules of that package it imports (lazy, relative and
    TYPE_CHECKING imports included: any of them closes a circle a reader has to untangle)."""
    paths = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (REPO / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # `from .x import y`, `from .. import z`
                    parent = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_reports_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_inside_deployments() -> None:
    """Modules under deployments/ form a DAG: shared state gets its own module (e.g.
    `deployments/llm/sequence.py`) instead of two modules importing each other."""
    graph = module_graph("deployments")
    assert "deployments.llm.sequence" in graph["deployments.llm.continuous"]  # the graph sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle inside deployments/: " + " -> ".join(cycle or [])
