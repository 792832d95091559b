"""Real throwaway PostgreSQL and Redis servers on 127.0.0.1 for tests, as pytest fixtures.

Import the fixtures into a test module (`from servers import db_url, postgres_server, ...`).
They skip, saying which Debian package is missing, only when the binaries are absent:
`postgresql` (initdb/pg_ctl, any version under /usr/lib/postgresql) and `redis-server`.
PostgreSQL refuses to run as root, so as root the cluster is created and run as user postgres.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Module level: the fake route's annotations are strings (PEP 563) that FastAPI resolves here.
from serve_app.tenancy import CurrentTenant, TenancyDep  # noqa: F401


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class PgServer:
    port: int
    root: Path
    bin: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # name is ours, not user input
        return self.url(name)


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{c}'" for c in cmd)]


def start_postgres() -> PgServer:
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries not found: apt-get install -y postgresql")
    root = Path(tempfile.mkdtemp(prefix="genserve-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-A", "trust", "--no-sync", "-U", "postgres",
                                 "-D", str(data)]), check=True, capture_output=True)
    opts = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=300")
    subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", opts,
                                 "-w", "-t", "60", "start"]), check=True, capture_output=True)
    return PgServer(port=port, root=root, bin=bin_dir)


def stop_postgres(server: PgServer) -> None:
    subprocess.run(_as_postgres([str(server.bin / "pg_ctl"), "-D", str(server.root / "data"), "-m", "immediate",
                                 "-w", "stop"]), capture_output=True)
    shutil.rmtree(server.root, ignore_errors=True)


@dataclass
class RedisServer:
    port: int
    root: Path
    pid: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_redis() -> RedisServer:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not found: apt-get install -y redis-server")
    root = Path(tempfile.mkdtemp(prefix="genserve-redis-"))
    port, pidfile = free_port(), root / "redis.pid"
    subprocess.run([exe, "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "yes", "--save", "",
                    "--appendonly", "no", "--dir", str(root), "--pidfile", str(pidfile)], check=True)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    while not pidfile.exists():
        time.sleep(0.05)
    client.close()
    return RedisServer(port=port, root=root, pid=int(pidfile.read_text().strip()))


def stop_redis(server: RedisServer) -> None:
    try:
        os.kill(server.pid, signal.SIGTERM)  # the daemon we started, by its pid
    except ProcessLookupError:
        pass
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PgServer]:
    server = start_postgres()
    try:
        yield server
    finally:
        stop_postgres(server)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    try:
        yield server
    finally:
        stop_redis(server)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    return redis_server.url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: a SQLite file, or a new database on the session's Postgres."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'genserve.db'}"
    return request.getfixturevalue("postgres_server").create_database()


def make_tenancy(db_url: str, work_dir: Path, *, plans: list[dict] | None = None, **overrides: object):
    """A Tenancy on `db_url` with test-friendly plans (override any TenancyConfig field)."""
    from serve_app.tenancy import Tenancy, TenancyConfig

    raw: dict[str, object] = {"database_url": db_url, "admin_token": "admin-secret", "key_pepper": "pepper"}
    if plans is not None:
        raw["plans"] = plans
        raw["default_plan"] = plans[0]["name"]
    raw.update(overrides)
    return Tenancy(TenancyConfig(**raw), work_dir=work_dir)


def tenancy_app(tenancy):  # type: ignore[no-untyped-def]
    """A small FastAPI app wired the way the ingress wires tenancy: the routers, the error
    handlers, and a fake `/v1/chat/completions` (one token per word) that meters its usage."""
    import json

    import anyio
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from serve_app.config import AppConfig, DiffusionModelConfig
    from serve_app.errors import install_error_handlers
    from serve_app.state import Services
    from serve_app.tenancy import (
        MeteredStreamingResponse,
        admin_router,
        ensure_model_allowed,
        metered,
        usage_router,
    )

    app = FastAPI()
    install_error_handlers(app)
    cfg = AppConfig(diffusion_models=[DiffusionModelConfig(name="tiny", family="sdxl", model="none")])
    app.state.services = Services(config=cfg, tenancy=tenancy)
    app.include_router(admin_router)
    app.include_router(usage_router)

    @app.post("/v1/chat/completions")
    async def chat(body: dict, ctx: CurrentTenant, tenancy: TenancyDep):  # type: ignore[no-untyped-def]
        model, n = body["model"], int(body.get("max_tokens", 8))
        ensure_model_allowed(ctx, model)
        prompt_tokens = len(" ".join(m["content"] for m in body["messages"]).split())
        adm = await tenancy.admit(ctx, route="chat", model=model, est_tokens=prompt_tokens + n)
        adm.add(prompt_tokens=prompt_tokens)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

        async def engine():  # type: ignore[no-untyped-def]
            for i in range(n):
                await anyio.sleep(float(body.get("delay", 0)))
                yield {"text": f"w{i} ", "tokens": 1}
            if body.get("stream_options", {}).get("include_usage"):
                yield {"text": None, "tokens": 0, "usage": usage}

        if not body.get("stream"):
            async with adm:
                text = "".join([c["text"] async for c in engine() if c["text"]])
                adm.set_usage(usage)
            return JSONResponse({"choices": [{"message": {"role": "assistant", "content": text}}], "usage": usage},
                                headers=adm.headers())

        async def sse():  # type: ignore[no-untyped-def]
            async for c in metered(adm, engine(), tokens_of=lambda c: c["tokens"], usage_of=lambda c: c.get("usage")):
                if c["text"] is not None:
                    yield "data: " + json.dumps({"choices": [{"delta": {"content": c["text"]}}]}) + "\n\n"
                else:
                    yield "data: " + json.dumps({"choices": [], "usage": c["usage"]}) + "\n\n"
            yield "data: [DONE]\n\n"

        return MeteredStreamingResponse(sse(), adm, media_type="text/event-stream")

    return app
