"""LoRA adapters through Serve's model multiplexing, on the shared local cluster: the real
`LLMDeployment` (transformers engine, tiny model) called through a DeploymentHandle with
`multiplexed_model_id`, as the ingress calls it. Three adapters on a replica that holds two: Serve
evicts the least recently used, and every answer stays the adapter's own."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from deployments.llm.config import LLMModelConfig, LoRAConfig
from deployments.llm.tiny import build_tiny_llm, build_tiny_llm_adapters
from deployments.llm.types import GenerationRequest, LoRAAdapter

pytest.importorskip("peft")

WORK = Path(os.environ.get("GENSERVE_WORK", Path(__file__).resolve().parent.parent / ".work")).resolve()
PROMPT = "a cat in the city at night"


@pytest.fixture(scope="module")
def deployed(genserve_url: str):  # the session's Serve instance (its HTTP port), as other Serve tests share
    from ray import serve

    from deployments.llm.deployment import LLMDeployment

    base = build_tiny_llm(WORK / "models" / "llm-tiny")
    dirs = build_tiny_llm_adapters(WORK / "models" / "llm-tiny-lora", base)
    adapters = {n: LoRAAdapter(id=f"global-{n}", path=str(p), name=n) for n, p in dirs.items()}
    cfg = LLMModelConfig(name="tiny-lora", model=str(base), engine="transformers", max_model_len=256,
                         lora=LoRAConfig(enabled=True, max_adapters_per_replica=2, max_loras=2, max_lora_rank=8))
    handle = serve.run(LLMDeployment.options(name=cfg.deployment_name, ray_actor_options={"num_cpus": 0.25})
                       .bind(cfg, work_dir=str(WORK)),
                       name="lora-llm-test", route_prefix=None)
    yield handle, adapters
    serve.delete("lora-llm-test")


def request(rid: str, adapter: LoRAAdapter | None) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt=PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True,
                             adapter=adapter)


async def call(handle, rid: str, adapter: LoRAAdapter | None) -> str:
    h = handle.options(multiplexed_model_id=adapter.id) if adapter is not None else handle
    return (await h.generate.remote(request(rid, adapter))).choices[0].text


async def stream(handle, rid: str, adapter: LoRAAdapter | None) -> str:
    h = handle.options(stream=True, multiplexed_model_id=adapter.id if adapter else "")
    text = []
    async for batch in h.generate_stream.remote(request(rid, adapter)):
        text.extend(getattr(item, "text", "") for item in batch)
    return "".join(text)


async def test_three_adapters_on_a_replica_that_holds_two(deployed):
    handle, adapters = deployed
    base = await call(handle, "base", None)
    first = {n: await call(handle, f"first-{n}", a) for n, a in adapters.items()}  # a evicted by c
    assert len({base, *first.values()}) == 4  # each adapter changes the output, each differently
    stats = await handle.stats.remote()
    assert stats["adapters"]["loaded"] == ["global-tiny-b", "global-tiny-c"]  # LRU: tiny-a went
    # Round robin over three with room for two: every call past the first two is a cold load.
    order = ["tiny-a", "tiny-b", "tiny-c", "tiny-a", "tiny-c", "tiny-b"]
    for i, n in enumerate(order):
        assert await call(handle, f"rr-{i}", adapters[n]) == first[n]
    stats = await handle.stats.remote()
    assert len(stats["adapters"]["loaded"]) <= 2
    assert await call(handle, "base-after", None) == base


async def test_concurrent_streams_of_three_adapters_and_the_base(deployed):
    handle, adapters = deployed
    solo = {n: await call(handle, f"solo-{n}", a) for n, a in adapters.items()}
    solo[None] = await call(handle, "solo-base", None)
    names = [None, "tiny-a", "tiny-b", "tiny-c"] * 2
    # Two adapters fit at once, so some of these wait for an eviction while others still run.
    got = await asyncio.gather(*(stream(handle, f"mix-{i}", adapters[n] if n else None)
                                 for i, n in enumerate(names)))
    assert got == [solo[n] for n in names]
    for _ in range(100):  # an evicted adapter leaves when its last stream has closed, just after it ended
        stats = (await handle.stats.remote())["adapters"]
        if len(stats["loaded"]) <= 2:
            break
        await asyncio.sleep(0.1)
    assert len(stats["loaded"]) <= 2 and not stats["in_use"]
