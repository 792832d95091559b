"""The transformers engine regroups a batch's clients: after a batch of k, up to k requests that
come back within `regroup_wait_ms` share the next batch even when they trickle in (no Ray)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from deployments.llm.tiny import build_tiny_llm
from deployments.llm.transformers_engine import TransformersEngine
from deployments.llm.types import SamplingParams

WORK = Path(os.environ.get("GENSERVE_WORK", Path(__file__).resolve().parent.parent / ".work")).resolve()


async def _one(engine: TransformersEngine, rid: str) -> None:
    async for _ in engine.generate(rid, [1, 5, 9, 13], SamplingParams(max_tokens=4, seed=1)):
        pass


@pytest.mark.asyncio
async def test_trickling_clients_of_a_batch_share_the_next_one() -> None:
    engine = TransformersEngine(str(build_tiny_llm(WORK / "models" / "llm-tiny")), max_model_len=128,
                                dtype="float32", device="cpu", batch_wait_ms=5, regroup_wait_ms=3000,
                                scheduler="static")
    await engine.start()
    try:
        await asyncio.gather(*(_one(engine, f"a{i}") for i in range(4)))  # arrive together
        assert list(engine.batch_sizes) == [4]

        async def late(i: int) -> None:
            await asyncio.sleep(0.1 * i)  # 100 ms apart: far beyond the 5 ms burst window
            await _one(engine, f"b{i}")

        await asyncio.gather(*(late(i) for i in range(4)))
        assert list(engine.batch_sizes) == [4, 4]

        await asyncio.sleep(3.2)  # past the regroup window: a lone request does not wait for company
        t0 = asyncio.get_running_loop().time()
        await _one(engine, "c")
        assert list(engine.batch_sizes) == [4, 4, 1]
        assert asyncio.get_running_loop().time() - t0 < 2.5  # not held for the 3 s regroup window
    finally:
        await engine.shutdown()
