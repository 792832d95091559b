"""The chat/completions HTTP API without Ray: the real router, service and SSE framing, served by
uvicorn, in front of a real LLMServer (transformers engine, tiny model) called in-process
through `LocalHandle`, which mirrors the DeploymentHandle calls the service makes onto the methods
`LLMDeployment` forwards them to. The same
API through Serve is tested in test_llm_http.py."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import uvicorn
from fastapi import FastAPI

from deployments.llm.config import LLMModelConfig
from deployments.llm.server import LLMServer
from deployments.llm.tiny import build_tiny_llm
from serve_app.chat import router as chat_router
from serve_app.config import AppConfig
from serve_app.errors import install_error_handlers
from serve_app.state import Services
from serve_app.tenancy import Tenancy

WORK = Path(os.environ.get("GENSERVE_WORK", Path(__file__).resolve().parent.parent / ".work")).resolve()
CTX = 256

pytestmark = pytest.mark.asyncio(loop_scope="module")


class _Call:
    def __init__(self, fn) -> None:  # type: ignore[no-untyped-def]
        self.fn = fn

    def remote(self, *args):  # type: ignore[no-untyped-def]
        return self.fn(*args)


class _Stream:
    """What `handle.options(stream=True).method.remote()` returns: async iterator + cancel()."""

    def __init__(self, agen) -> None:  # type: ignore[no-untyped-def]
        self.agen = agen
        self.task: asyncio.Task | None = None

    def __aiter__(self):  # type: ignore[no-untyped-def]
        return self

    async def __anext__(self):  # type: ignore[no-untyped-def]
        return await self.agen.__anext__()

    def cancel(self) -> None:
        asyncio.ensure_future(self.agen.aclose())


class LocalHandle:
    # handle method -> the LLMServer method LLMDeployment forwards it to (where the names differ)
    FORWARDS = {"generate": "generate_traced"}

    def __init__(self, server: LLMServer, stream: bool = False) -> None:
        self.server, self.stream = server, stream

    def options(self, *, stream: bool = False) -> LocalHandle:
        return LocalHandle(self.server, stream)

    def __getattr__(self, name: str) -> _Call:
        method = getattr(self.server, self.FORWARDS.get(name, name))
        if self.stream:
            return _Call(lambda *a: _Stream(method(*a)))
        return _Call(method)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app_url(tmp_path_factory):
    model = build_tiny_llm(WORK / "models" / "llm-tiny")
    llm_cfg = {"name": "tiny-chat", "model": str(model), "engine": "transformers", "max_model_len": CTX,
               "default_max_tokens": 8, "aliases": ["chat"]}
    config = AppConfig.model_validate({
        "diffusion_models": [{"name": "sdxl-tiny", "family": "sdxl", "model": "unused"}],
        "llm_models": [llm_cfg],
        "tenancy": {"local_tenant": {"enabled": False}},
    })
    # The routes authenticate and meter every request: a real tenancy DB (SQLite) and key.
    tenancy = Tenancy(config.tenancy, work_dir=tmp_path_factory.mktemp("llm-api"))
    tenancy.create_tenant("llm-tests", "enterprise")
    auth = {"Authorization": f"Bearer {tenancy.create_key('llm-tests').key}"}
    server = LLMServer(LLMModelConfig(**llm_cfg, stream_interval_ms=10))
    await server.start()
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(chat_router.router)
    app.state.services = Services(config=config, llm={"tiny-chat": LocalHandle(server)},
                                  tenancy=tenancy)
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(http.serve())
    while not http.started:
        await asyncio.sleep(0.02)
    port = http.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", server, auth
    http.should_exit = True
    await task
    tenancy.close()


def chat_body(**kw) -> dict:
    return {"model": "tiny-chat", "messages": [{"role": "user", "content": "a red castle"}], **kw}


async def sse_events(resp: httpx.Response) -> list:
    events = []
    async for line in resp.aiter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_chat_non_streamed_and_streamed_agree(app_url):
    url, _, auth = app_url
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=auth) as c:
        r = await c.post("/v1/chat/completions", json=chat_body(max_tokens=12, temperature=0))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["model"] == "tiny-chat"
        usage = body["usage"]
        assert usage["completion_tokens"] == 12 or body["choices"][0]["finish_reason"] == "stop"
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        body_s = chat_body(max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
        async with c.stream("POST", "/v1/chat/completions", json=body_s) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert text == body["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage
    assert all(ch["usage"] is None for ch in chunks[:-1])


async def test_completions_with_alias_n_and_stop(app_url):
    url, _, auth = app_url
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=auth) as c:
        r = await c.post("/v1/completions", json={"model": "chat", "prompt": "hello", "n": 2, "max_tokens": 5,
                                                  "seed": 3, "stop": ["\n\n"], "user": "u1"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == "tiny-chat"
        assert [ch["index"] for ch in body["choices"]] == [0, 1]
        async with c.stream("POST", "/v1/completions",
                            json={"model": "chat", "prompt": "hello", "max_tokens": 5, "stream": True}) as resp:
            events = await sse_events(resp)
    assert events[-1] == "[DONE]" and all(e["object"] == "text_completion" for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (chat_body(messages=[]), 400, "messages"),
        (chat_body(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role"),
        (chat_body(temperature=-0.5), 400, "temperature"),
        (chat_body(model="gpt-9"), 404, "model"),
        (chat_body(model="sdxl-tiny"), 400, "model"),
        (chat_body(max_tokens=CTX + 10), 400, "max_tokens"),
        (chat_body(max_tokens=CTX - 3), 400, "max_tokens"),  # fits alone, not with the prompt
        (chat_body(messages=[{"role": "user", "content": "castle " * CTX}]), 413, "messages"),
        (chat_body(n=0), 400, "n"),
        (chat_body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ],
)
async def test_bad_input_gets_openai_errors(app_url, body, status, param):
    url, _, auth = app_url
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=auth) as c:
        for stream in (False, True):  # a streamed request is rejected before its stream starts
            r = await c.post("/v1/chat/completions", json={**body, "stream": stream})
            assert r.status_code == status, r.text
            err = r.json()["error"]
            assert err["param"] == param and err["message"]


async def test_client_disconnect_aborts_generation(app_url):
    url, server, auth = app_url
    engine = server.engine
    body = chat_body(max_tokens=CTX - 40, stream=True)
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=auth) as c:
        async with c.stream("POST", "/v1/chat/completions", json=body) as resp:
            lines = resp.aiter_lines()
            while not (await lines.__anext__()).startswith("data: "):
                pass
            assert engine.num_running() == 1
        # leaving the block closes the connection mid-stream
    for _ in range(100):
        if engine.num_running() == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.num_running() == 0


async def test_engine_failure_mid_stream_sends_an_error_chunk(app_url, monkeypatch):
    url, server, auth = app_url
    engine = server.engine
    real = engine.generate

    async def failing(request_id, ids, sampling):  # type: ignore[no-untyped-def]
        n = 0
        async for d in real(request_id, ids, sampling):
            yield d
            n += 1
            if n == 2:
                raise RuntimeError("engine fell over")

    monkeypatch.setattr(engine, "generate", failing)
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=auth) as c:
        async with c.stream("POST", "/v1/chat/completions", json=chat_body(max_tokens=30, stream=True)) as resp:
            assert resp.status_code == 200
            events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "server_error" and events[-2]["error"]["code"] == "generation_failed"
