"""Both LLM engines, for real, on the tiny random-weight model (no Ray): streaming, usage, abort,
stop sequences, n > 1, seeds, context limits. One engine per kind for the whole module."""

from __future__ import annotations

import asyncio
import os
from contextlib import aclosing
from pathlib import Path

import pytest
import pytest_asyncio

from deployments.llm.config import LLMModelConfig
from deployments.llm.engine import build_engine, vllm_available
from deployments.llm.server import LLMServer
from deployments.llm.tiny import build_tiny_llm
from deployments.llm.types import GenerationRequest, LLMRequestError, SamplingParams, Started

WORK = Path(os.environ.get("GENSERVE_WORK", Path(__file__).resolve().parent.parent / ".work")).resolve()
CTX = 512
CHAT = ({"role": "user", "content": "a cat in the city at night"},)

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def tiny_llm() -> Path:
    return build_tiny_llm(WORK / "models" / "llm-tiny")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["transformers", "vllm"])
async def server(request, tiny_llm: Path):
    if request.param == "vllm" and not vllm_available():
        pytest.skip("vllm is not installed (make install-vllm)")
    kwargs = {"cache_dir": str(WORK / "cache")} if request.param == "vllm" else {}
    engine = build_engine(str(tiny_llm), engine=request.param, max_model_len=CTX, dtype="float32",
                          engine_kwargs=kwargs)
    cfg = LLMModelConfig(name="tiny", model=str(tiny_llm), max_model_len=CTX, default_max_tokens=16)
    srv = LLMServer(cfg, engine=engine)
    await srv.start()
    yield srv
    await engine.shutdown()


def chat(rid: str, **kw) -> GenerationRequest:
    return GenerationRequest(request_id=rid, messages=CHAT, **kw)


async def collect(server: LLMServer, req: GenerationRequest):
    items = [i async for i in server.stream(req)]
    assert isinstance(items[0], Started)
    return items[0], items[1:]


async def test_streamed_deltas_add_up_to_the_whole_text(server: LLMServer):
    req = chat("greedy-1", max_tokens=24, temperature=0.0)
    started, deltas = await collect(server, req)
    result = await server.generate(chat("greedy-2", max_tokens=24, temperature=0.0))
    streamed = "".join(d.text for d in deltas)
    assert streamed == result.choices[0].text
    assert deltas[-1].finish_reason == result.choices[0].finish_reason
    # and both equal the tokenizer's decoding of the tokens the engine produced
    ids = server.prompt_token_ids(req)
    tokens = []
    async for d in server.engine.generate("greedy-3", ids, SamplingParams(max_tokens=24, temperature=0.0)):
        tokens.extend(d.token_ids)
    assert server.engine.tokenizer.decode(tokens, skip_special_tokens=True) == streamed


async def test_usage_matches_the_tokenizer(server: LLMServer):
    tok = server.engine.tokenizer
    result = await server.generate(chat("usage", max_tokens=10, temperature=0.0))
    templated = tok.apply_chat_template(list(CHAT), add_generation_prompt=True, tokenize=False)
    assert result.prompt_tokens == len(tok(templated, add_special_tokens=False)["input_ids"])
    choice = result.choices[0]
    assert result.completion_tokens == choice.num_tokens
    if choice.finish_reason == "length":
        assert choice.num_tokens == 10
    completion = await server.generate(GenerationRequest(request_id="usage-c", prompt="hello world", max_tokens=3))
    assert completion.prompt_tokens == len(tok("hello world")["input_ids"])


async def test_closing_the_stream_aborts_the_sequence(server: LLMServer):
    engine = server.engine
    ids = server.prompt_token_ids(chat("x"))
    stream = engine.generate("abort-1", ids, SamplingParams(max_tokens=CTX - len(ids) - 1, temperature=0.0))
    async with aclosing(stream):
        await stream.__anext__()
        await stream.__anext__()
        assert engine.num_running() == 1
    for _ in range(100):  # the engine drops it at its next step
        if engine.num_running() == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.num_running() == 0


async def test_abort_by_request_id_ends_the_stream(server: LLMServer):
    engine = server.engine
    ids = server.prompt_token_ids(chat("x"))
    reasons = []

    async def consume() -> None:
        async for d in engine.generate("abort-2", ids, SamplingParams(max_tokens=CTX - len(ids) - 1)):
            reasons.append(d.finish_reason)

    task = asyncio.create_task(consume())
    while not reasons:
        await asyncio.sleep(0.01)
    await engine.abort("abort-2")
    await asyncio.wait_for(task, 30)
    assert len(reasons) < CTX - len(ids) - 1
    assert engine.num_running() == 0


async def test_stop_sequence_cuts_the_text(server: LLMServer):
    full = (await server.generate(chat("stop-0", max_tokens=30, temperature=0.0))).choices[0].text
    # a stop string from the middle of the greedy text: plain ASCII letters, first occurrence known
    start = next(i for i in range(4, len(full) - 3) if full[i:i + 3].isascii() and full[i:i + 3].isalpha())
    stop = full[start:start + 3]
    expected = full[: full.find(stop)]
    result = await server.generate(chat("stop-1", max_tokens=30, temperature=0.0, stop=(stop, "zzzz-never")))
    assert result.choices[0].text == expected
    assert result.choices[0].finish_reason == "stop"
    _, deltas = await collect(server, chat("stop-2", max_tokens=30, temperature=0.0, stop=(stop,)))
    assert "".join(d.text for d in deltas) == expected  # no partial stop string leaked by the stream


async def test_n_choices_and_seeds(server: LLMServer):
    req = chat("n-1", n=3, max_tokens=12, temperature=1.0, seed=5)
    a = await server.generate(req)
    b = await server.generate(chat("n-2", n=3, max_tokens=12, temperature=1.0, seed=5))
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("length", "stop") for c in a.choices)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed: same choices
    assert len({c.text for c in a.choices}) > 1  # choice i samples with seed + i
    assert a.completion_tokens == sum(c.num_tokens for c in a.choices)
    other = await server.generate(chat("n-3", max_tokens=12, temperature=1.0, seed=6))
    assert other.choices[0].text != a.choices[0].text


async def test_context_overflow_is_a_request_error(server: LLMServer):
    long_prompt = "hello world " * CTX
    with pytest.raises(LLMRequestError) as e:
        await server.generate(GenerationRequest(request_id="long", prompt=long_prompt))
    assert e.value.status == 413 and e.value.code == "context_length_exceeded"
    with pytest.raises(LLMRequestError) as e:
        await server.generate(chat("too-many", max_tokens=CTX - 5))
    assert e.value.status == 400 and e.value.param == "max_tokens"
    assert "max_tokens" in e.value.message and str(CTX) in e.value.message
    # default max_tokens is capped by the room left, not an error
    room_req = GenerationRequest(request_id="room", prompt="hello " * (CTX - 8), temperature=0.0)
    result = await server.generate(room_req)
    assert result.prompt_tokens + result.completion_tokens <= CTX
