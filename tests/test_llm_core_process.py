"""The transformers engine with its model loop in a child process (`engine_process: true`), on the
tiny model (no Ray): the same tokens as in-process, aborts reach the core, a dead core fails the
open streams and the health check instead of hanging them, and a load failure fails `start`."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from engine_streams import tokens

from deployments.llm.tiny import build_tiny_llm
from deployments.llm.transformers_engine import TransformersEngine
from deployments.llm.types import SamplingParams

WORK = Path(os.environ.get("GENSERVE_WORK", Path(__file__).resolve().parent.parent / ".work")).resolve()
PROMPT = [1, 5, 9, 13]


def _engine(process: bool, **kw) -> TransformersEngine:
    return TransformersEngine(str(build_tiny_llm(WORK / "models" / "llm-tiny")), dtype="float32", device="cpu",
                              max_batch_size=4, engine_process=process, **{"max_model_len": 256, **kw})


async def _answers(eng: TransformersEngine) -> list[tuple[list[int], str | None]]:
    await eng.start()
    try:
        return await asyncio.gather(
            tokens(eng, "greedy", PROMPT, SamplingParams(max_tokens=16, temperature=0.0)),
            tokens(eng, "seeded", PROMPT, SamplingParams(max_tokens=16, seed=7, top_p=0.9)),
            tokens(eng, "long", PROMPT, SamplingParams(max_tokens=30, seed=1, ignore_eos=True)))
    finally:
        await eng.shutdown()


@pytest.mark.asyncio
async def test_the_core_process_generates_what_the_in_process_loop_does() -> None:
    inline, apart = await _answers(_engine(False)), await _answers(_engine(True))
    assert apart == inline
    assert apart[2] == (apart[2][0], "length") and len(apart[2][0]) == 30


@pytest.mark.asyncio
async def test_an_early_close_aborts_in_the_core_and_it_keeps_serving() -> None:
    eng = _engine(True)
    await eng.start()
    try:
        stream = eng.generate("left", PROMPT, SamplingParams(max_tokens=200, ignore_eos=True))
        await stream.__anext__()
        assert eng.num_running() == 1
        await stream.aclose()  # what the server does when the client disconnects
        assert eng.num_running() == 0
        steps = len(eng.batch_sizes)
        ids, reason = await tokens(eng, "next", PROMPT, SamplingParams(max_tokens=5, temperature=0.0))
        assert (len(ids), reason) == (5, "length")
        # the aborted row left the batch: the new request decoded alone (rows of 1)
        assert set(list(eng.batch_sizes)[steps:]) == {1}
        await eng.check_health()
    finally:
        await eng.shutdown()


@pytest.mark.asyncio
async def test_a_dead_core_fails_open_streams_and_the_health_check() -> None:
    eng = _engine(True)
    await eng.start()
    try:
        stream = eng.generate("doomed", PROMPT, SamplingParams(max_tokens=250, ignore_eos=True))
        await stream.__anext__()
        os.kill(eng._core._proc.pid, signal.SIGKILL)
        async def drain() -> None:
            async for _ in stream:
                pass

        with pytest.raises(RuntimeError):  # an error, not a hang
            await asyncio.wait_for(drain(), 30)
        with pytest.raises(RuntimeError, match="engine core"):
            await eng.check_health()
        with pytest.raises(RuntimeError):
            await tokens(eng, "after", PROMPT, SamplingParams(max_tokens=3))
    finally:
        await eng.shutdown()


@pytest.mark.asyncio
async def test_a_load_failure_in_the_core_fails_start_with_its_reason() -> None:
    eng = _engine(True, max_model_len=10**6)
    with pytest.raises(RuntimeError, match="max_position_embeddings"):
        await asyncio.wait_for(eng.start(), 120)
    assert eng._core._proc.poll() is not None  # the core process is gone, not left holding memory


def test_the_core_needs_the_continuous_scheduler() -> None:
    with pytest.raises(ValueError, match="continuous"):
        _engine(True, scheduler="static")
