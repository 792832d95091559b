"""The transformers engine's continuous batching on the tiny model (no Ray): sequences join and
leave a running batch between steps, and what a sequence generates does not depend on who shares
its steps (left padding, merged caches, trimmed columns)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import pytest_asyncio
from engine_streams import tokens

from deployments.llm.tiny import build_tiny_llm
from deployments.llm.transformers_engine import TransformersEngine
from deployments.llm.types import SamplingParams

WORK = Path(os.environ.get("GENSERVE_WORK", Path(__file__).resolve().parent.parent / ".work")).resolve()

pytestmark = pytest.mark.asyncio(loop_scope="module")

SHORT = [1, 5, 9, 13]
LONG = list(range(3, 43))  # 40 tokens: joining it pads one side or the other


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=[False, True], ids=["inline", "core-process"])
async def engine(request):
    eng = TransformersEngine(str(build_tiny_llm(WORK / "models" / "llm-tiny")), max_model_len=256,
                             dtype="float32", device="cpu", max_batch_size=4, engine_process=request.param)
    await eng.start()
    assert eng.scheduler == "continuous"
    yield eng
    await eng.shutdown()


async def test_a_sequence_is_the_same_alone_and_joining_a_running_batch(engine: TransformersEngine):
    greedy, seeded = SamplingParams(max_tokens=24, temperature=0.0), SamplingParams(max_tokens=24, seed=3)
    alone_short, _ = await tokens(engine, "a-short", SHORT, greedy)
    alone_long, _ = await tokens(engine, "a-long", LONG, SamplingParams(max_tokens=40, temperature=0.0))
    alone_seeded, _ = await tokens(engine, "a-seeded", SHORT, seeded)

    engine.batch_sizes.clear()
    running = asyncio.Event()
    long_task = asyncio.create_task(tokens(engine, "b-long", LONG, SamplingParams(max_tokens=40, temperature=0.0),
                                           running, after=5))
    await running.wait()  # the long one is decoding: the short ones join it midway
    joined_short, joined_seeded = await asyncio.gather(tokens(engine, "b-short", SHORT, greedy),
                                                       tokens(engine, "b-seeded", SHORT, seeded))
    joined_long, _ = await long_task

    assert max(engine.batch_sizes) >= 2, "the sequences never shared a step"
    assert joined_short[0] == alone_short
    assert joined_seeded[0] == alone_seeded
    assert joined_long == alone_long


async def test_a_short_request_does_not_wait_for_a_long_one(engine: TransformersEngine):
    order: list[str] = []

    async def run(rid: str, prompt: list[int], n: int, started: asyncio.Event | None = None) -> None:
        await tokens(engine, rid, prompt, SamplingParams(max_tokens=n, temperature=0.0), started, after=2)
        order.append(rid)

    running = asyncio.Event()
    long_task = asyncio.create_task(run("long", LONG, 200, running))
    await running.wait()
    await run("short", SHORT, 4)  # static batching would hold it until the 200 tokens are done
    await long_task
    assert order == ["short", "long"]


async def test_an_aborted_row_leaves_and_the_others_go_on(engine: TransformersEngine):
    greedy = SamplingParams(max_tokens=30, temperature=0.0)
    alone, _ = await tokens(engine, "c-alone", LONG, greedy)
    running = asyncio.Event()
    victim = asyncio.create_task(tokens(engine, "c-victim", SHORT, SamplingParams(max_tokens=200, temperature=0.0),
                                        running, after=3))
    await running.wait()
    other = asyncio.create_task(tokens(engine, "c-other", LONG, greedy))
    await asyncio.sleep(0.05)
    await engine.abort("c-victim")
    ids, reason = await asyncio.wait_for(victim, 30)
    assert reason == "abort" and len(ids) < 200
    assert (await other)[0] == alone
    for _ in range(100):
        if engine.num_running() == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.num_running() == 0


async def test_more_requests_than_rows_wait_their_turn(engine: TransformersEngine):
    engine.batch_sizes.clear()
    results = await asyncio.gather(*(tokens(engine, f"d{i}", SHORT, SamplingParams(max_tokens=8, seed=i))
                                     for i in range(7)))
    assert all(len(ids) >= 1 and reason in ("stop", "length") for ids, reason in results)
    assert max(engine.batch_sizes) == 4  # max_batch_size rows at most, all seven served
