"""`coalesce`: the first item goes out at once, the rest per interval; errors and cancels pass through."""

from __future__ import annotations

import asyncio

import pytest

from deployments.llm.coalesce import coalesce


async def _gen(items, gate: asyncio.Event | None = None, closed: list | None = None, fail: Exception | None = None):
    try:
        for i, x in enumerate(items):
            if i == 1 and gate is not None:
                await gate.wait()  # the rest only after the consumer saw the first list
            yield x
        if fail is not None:
            raise fail
    finally:
        if closed is not None:
            closed.append(True)


def test_first_item_is_not_held_for_the_interval():
    async def main():
        gate = asyncio.Event()
        out = coalesce(_gen([1, 2, 3, 4], gate), interval_s=60.0)
        # With a 60 s interval, an interval-ticking batcher would hold the first token for 60 s.
        first = await asyncio.wait_for(out.__anext__(), timeout=10)
        gate.set()
        rest = [b async for b in out]
        return first, rest

    first, rest = asyncio.run(main())
    assert first == [1]
    assert rest == [[2, 3, 4]]  # the end of the stream flushes at once, in one list


def test_stream_error_reaches_the_consumer_after_the_items():
    async def main():
        got = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for b in coalesce(_gen([1, 2], fail=RuntimeError("engine died")), interval_s=0.01):
                got.extend(b)
        return got

    assert asyncio.run(main()) == [1, 2]


def test_cancelling_the_consumer_closes_the_stream():
    async def main():
        closed: list = []
        gate = asyncio.Event()  # never set: the stream blocks after its first item
        out = coalesce(_gen([1, 2], gate, closed), interval_s=0.01)
        assert await out.__anext__() == [1]
        await out.aclose()
        await asyncio.sleep(0.05)
        return closed

    assert asyncio.run(main()) == [True]


async def _spaced(items, gap_s: float):
    for x in items:
        yield x
        await asyncio.sleep(gap_s)


def test_interval_asked_before_each_wait_switches_between_per_item_and_batched():
    """A callable interval: 0 sends each item as it comes, a positive one batches (the replica
    switches with the number of open streams)."""
    async def main(interval):
        return [b async for b in coalesce(_spaced(range(8), 0.01), interval_s=interval)]

    per_item = asyncio.run(main(lambda: 0.0))
    assert per_item == [[i] for i in range(8)]
    mode = {"wait": 0.0}

    def switching() -> float:  # per item for the first lists, then batched, as when streams pile up
        mode["calls"] = mode.get("calls", 0) + 1
        return 0.0 if mode["calls"] <= 2 else 0.2

    mixed = asyncio.run(main(switching))
    assert mixed[:3] == [[0], [1], [2]] and len(mixed) < 8
    assert [x for b in mixed for x in b] == list(range(8))


def test_replica_streams_per_token_until_more_streams_than_the_threshold_are_open():
    from deployments.llm.config import LLMModelConfig
    from deployments.llm.server import LLMServer
    from deployments.llm.tiny import build_tiny_llm
    from deployments.llm.types import ChoiceDelta, GenerationRequest
    from tests.conftest import WORK

    model = build_tiny_llm(WORK / "models" / "llm-tiny")

    async def message_sizes(coalesce_above: int) -> list[int]:
        cfg = LLMModelConfig(name="tiny", model=str(model), engine="transformers", max_model_len=256,
                             stream_interval_ms=1000, stream_coalesce_above=coalesce_above)
        server = LLMServer(cfg)
        await server.start()
        try:
            req = GenerationRequest(request_id="r", prompt="a red castle", max_tokens=8, ignore_eos=True, seed=1)
            sizes = []
            async for msg in server.generate_stream(req):
                deltas = [d for d in msg if isinstance(d, ChoiceDelta)]
                if deltas:
                    sizes.append(sum(d.num_tokens for d in deltas))
            return sizes
        finally:
            await server.shutdown()

    # One open stream, threshold 1: tokens leave as they come (what is ready goes together) despite
    # the 1 s interval: 8 tokens take far less than 1 s on the tiny model.
    per_token = asyncio.run(message_sizes(coalesce_above=1))
    assert sum(per_token) == 8 and len(per_token) >= 5, per_token
    # Threshold 0 (always coalesce): the first token at once, the other 7 in the interval's batch.
    batched = asyncio.run(message_sizes(coalesce_above=0))
    assert sum(batched) == 8 and len(batched) <= 3, batched
