"""The LLM's share clock (deployments/llm/share_clock.py): requests' GPU-seconds add up to the
replica's busy time however they overlap, and LLMServer reports them on its deltas and results."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from deployments.llm.config import LLMModelConfig
from deployments.llm.server import LLMServer
from deployments.llm.share_clock import ShareClock, clock_for, replica_gpus
from deployments.llm.types import ChoiceDelta, GenerationRequest, SamplingParams, Started, TokenDelta


class FakeTime:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def test_overlapping_requests_sum_to_busy_time() -> None:
    now = FakeTime()
    clock = ShareClock(gpus=1.0, now=now)
    a = clock.enter()          # t=100: A alone
    now.t = 102.0
    b = clock.enter()          # t=102: A and B share
    now.t = 106.0
    a.leave()                  # A: 2 + 4/2 = 4 s
    now.t = 107.0
    b.leave()                  # B: 4/2 + 1 = 3 s
    now.t = 110.0              # idle: nobody is billed
    c = clock.enter(weight=2)  # t=110: C (n=2 choices) and D share 3 ways
    d = clock.enter()
    now.t = 113.0
    d.leave()                  # D: 3/3 = 1 s
    now.t = 114.0
    c.leave()                  # C: 2·3/3 + 1 = 3 s
    assert [s.gpu_seconds() for s in (a, b, c, d)] == pytest.approx([4.0, 3.0, 3.0, 1.0])
    assert clock.busy_s == pytest.approx(11.0)  # 100..107 and 110..114
    assert sum(s.gpu_seconds() for s in (a, b, c, d)) == pytest.approx(clock.busy_s)
    assert a.leave() == pytest.approx(4.0) and clock.active == 0  # leaving twice changes nothing


def test_random_overlaps_sum_exactly_and_scale_by_gpus() -> None:
    rng = random.Random(7)
    now = FakeTime()
    clock = ShareClock(gpus=0.5, now=now)
    events = []
    for i in range(300):
        start = rng.uniform(0, 500)
        events += [(start, "in", i, rng.randint(1, 4)), (start + rng.expovariate(1 / 8), "out", i, 0)]
    shares, spans = {}, {}
    for t, kind, i, w in sorted(events):
        now.t = t
        if kind == "in":
            shares[i], spans[i] = clock.enter(w), (t, None)
        else:
            shares[i].leave()
            spans[i] = (spans[i][0], t)
    busy = _union_length([s for s in spans.values()])  # type: ignore[misc]
    assert clock.busy_s == pytest.approx(busy, rel=1e-9)
    assert sum(s.gpu_seconds() for s in shares.values()) == pytest.approx(0.5 * busy, rel=1e-9)
    # A share read while running grows; once left it is fixed.
    live = clock.enter()
    now.t += 3
    assert live.gpu_seconds() == pytest.approx(1.5)
    now.t += 3
    assert live.leave() == pytest.approx(3.0)
    now.t += 10
    assert live.gpu_seconds() == pytest.approx(3.0)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="gpus"):
        ShareClock(gpus=0)
    with pytest.raises(ValueError, match="weight"):
        ShareClock().enter(0)


def test_outside_a_ray_worker_a_replica_counts_one() -> None:
    assert replica_gpus() == 1.0


# -- LLMServer reports them ---------------------------------------------------------------------


class _Tok:
    def __call__(self, text, **_):  # type: ignore[no-untyped-def]
        return {"input_ids": [1] * len(text.split())}


class SleepyEngine:
    """One token per `step_s` of real time, `max_tokens` of them."""

    name = "fake"
    max_model_len = 512
    tokenizer = _Tok()

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s

    async def start(self) -> None: ...

    async def generate(self, request_id: str, prompt: list[int], sp: SamplingParams) -> AsyncIterator[TokenDelta]:
        for i in range(sp.max_tokens):
            await asyncio.sleep(self.step_s)
            yield TokenDelta("x ", (i,), "length" if i == sp.max_tokens - 1 else None)

    def num_running(self) -> int:
        return 0


async def _run_stream(server: LLMServer, rid: str, n: int, max_tokens: int) -> list[float]:
    seen = []
    async for item in server.stream(GenerationRequest(rid, prompt="a b c", n=n, max_tokens=max_tokens)):
        if isinstance(item, ChoiceDelta):
            seen.append(item.gpu_seconds)
    return seen


def test_server_deltas_carry_the_requests_share() -> None:
    async def main() -> None:
        cfg = LLMModelConfig(name="m", model="unused", engine="transformers", stream_interval_ms=0)
        server = LLMServer(cfg, engine=SleepyEngine(0.01))  # type: ignore[arg-type]
        clock = clock_for(server)
        runs = await asyncio.gather(*[_run_stream(server, f"r{i}", n=1 + i % 3, max_tokens=5 + 3 * i)
                                      for i in range(6)])
        for seen in runs:
            assert seen == sorted(seen) and seen[-1] > 0  # cumulative, growing
        assert clock.active == 0
        assert sum(seen[-1] for seen in runs) == pytest.approx(clock.busy_s, rel=1e-9)
        result = await server.generate(GenerationRequest("g", prompt="a", max_tokens=4))
        assert result.completion_tokens == 4 and 0.04 * 0.5 < result.gpu_seconds < 5
        # A stream closed early leaves the clock too (nobody keeps accruing).
        agen = server.stream(GenerationRequest("c", prompt="a", max_tokens=50))
        assert isinstance(await agen.__anext__(), Started)
        await agen.__anext__()
        await agen.aclose()
        assert clock.active == 0

    asyncio.run(main())


@pytest.mark.ray
def test_a_replica_counts_the_gpus_ray_gave_it(ray_cluster) -> None:  # type: ignore[no-untyped-def]
    """The shared cluster advertises one fake GPU: an actor asking 0.5 reports 0.5, one asking none 1.0."""

    @ray_cluster.remote(num_gpus=0.5, num_cpus=0)
    class Half:
        def gpus(self) -> float:
            from deployments.llm.share_clock import replica_gpus

            return replica_gpus()

    @ray_cluster.remote(num_cpus=0)
    class Cpu(Half.__ray_actor_class__):  # type: ignore[name-defined,misc]
        pass

    half, cpu = Half.remote(), Cpu.remote()
    assert ray_cluster.get(half.gpus.remote(), timeout=60) == 0.5
    assert ray_cluster.get(cpu.gpus.remote(), timeout=60) == 1.0
    for a in (half, cpu):
        ray_cluster.kill(a)
