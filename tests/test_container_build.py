"""Slow: build the CPU image with docker/build-offline.sh (buildah, vfs, chroot isolation, a
debootstrap base: no registry, no daemon) and serve the tiny models' /health from it.

Opt-in (GENSERVE_IMAGE_BUILD=1): it installs torch, Ray and vLLM into a fresh image (GBs, minutes),
so the default suite skips it. Needs root, `apt-get install buildah debootstrap`, the Debian mirror
and the package index the host's pip uses (its pip config and local paths are mounted read-only
into the install step, never copied into the image)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
TAG = "localhost/genserve:offline-test"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("GENSERVE_IMAGE_BUILD") != "1", reason="set GENSERVE_IMAGE_BUILD=1"),
    pytest.mark.skipif(not (shutil.which("buildah") and shutil.which("debootstrap")), reason="buildah, debootstrap"),
]


def _pip_setup(tmp: Path) -> tuple[Path, list[str]]:
    """The host's effective pip config as one file, and the local paths it names."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    settings: dict[str, str] = {}  # the same key may come from several files and the env: one each
    for ln in out.splitlines():
        key, _, value = ln.partition("=")
        name = key.split(".", 1)[-1]
        if name in ("cert", "constraint", "find-links", "extra-index-url", "index-url"):
            settings[name] = value.strip().strip("'")
    mounts = []
    for name, value in settings.items():
        for v in value.split():
            path = Path(v.removeprefix("file://"))
            if path.is_absolute() and path.exists():
                # A file index's pages link to files beside it (.../simple -> ../files): its parent.
                mounts.append(str(path.parent if path.is_file() or name.endswith("index-url") else path))
    lines = ["[global]", *(f"{k} = {v}" for k, v in settings.items())]
    conf = tmp / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf, sorted(set(mounts + ["/etc/ssl/certs"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_image_builds_and_serves_health(tmp_path: Path) -> None:
    work = Path(os.environ.get("GENSERVE_WORK", REPO / ".work"))
    conf, mounts = _pip_setup(tmp_path)
    env = {**os.environ, "STORE": str(work / "buildah"), "PIP_CONF": str(conf), "MOUNTS": " ".join(mounts)}
    build = subprocess.run([str(REPO / "docker" / "build-offline.sh"), TAG], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    assert "verify_install: cpu install matches pyproject.toml" in build.stdout + build.stderr

    b = ["buildah", "--storage-driver", "vfs", "--root", str(work / "buildah" / "root"),
         "--runroot", str(work / "buildah" / "run")]
    user = subprocess.run([*b, "inspect", "--format", "{{.OCIv1.Config.User}}", TAG], capture_output=True, text=True)
    assert user.stdout.strip() == "1000:100"
    ctr = subprocess.run([*b, "from", TAG], capture_output=True, text=True, check=True).stdout.strip()
    port = _free_port()
    # The image's user (1000) must read the tiny models: a world-readable copy, mounted read-only.
    models = tmp_path / "models"
    shutil.copytree(work / "models", models, symlinks=False)
    for path in [models, *models.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    # The image's own config and the repo's tiny models (read-only); the app's state in a tmpfs dir.
    proc = subprocess.Popen(
        [*b, "run", "--isolation", "chroot", "-v", f"{models}:/models:ro", "--env", "GENSERVE_WORK=/tmp/gs",
         "--env", "RAY_TMPDIR=/tmp/ray", ctr, "--", "sh", "-c",
         "mkdir -p /tmp/gs && ln -s /models /tmp/gs/models && "
         f"exec genserve run --config configs/local.yaml --port {port} --num-cpus 4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, last = time.monotonic() + 300, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                last = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                if last.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert last is not None and last.status_code == 200, (proc.poll(), last)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([*b, "rm", ctr], capture_output=True)
