"""EOS, `ignore_eos` and shutdown in the transformers engine, both schedulers (tiny model, no Ray).
The random model rarely samples EOS, so the tests make it certain: a large bias on the EOS logit."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch
from engine_streams import tokens

from deployments.llm.tiny import build_tiny_llm
from deployments.llm.transformers_engine import TransformersEngine
from deployments.llm.types import SamplingParams

WORK = Path(os.environ.get("GENSERVE_WORK", Path(__file__).resolve().parent.parent / ".work")).resolve()
PROMPT = [1, 5, 9, 13]


async def _engine(scheduler: str) -> TransformersEngine:
    eng = TransformersEngine(str(build_tiny_llm(WORK / "models" / "llm-tiny")), max_model_len=256,
                             dtype="float32", device="cpu", max_batch_size=4, scheduler=scheduler,
                             engine_process=False)  # in this process: the test edits its model
    await eng.start()
    assert eng.scheduler == scheduler
    return eng


def _always_eos(eng: TransformersEngine) -> None:
    head = eng._model.lm_head
    bias = torch.zeros(head.out_features)
    bias[eng.tokenizer.eos_token_id] = 1e4
    head.bias = torch.nn.Parameter(bias, requires_grad=False)


@pytest.mark.asyncio
@pytest.mark.parametrize("scheduler", ["continuous", "static"])
async def test_eos_ends_a_sequence_unless_ignored(scheduler: str) -> None:
    eng = await _engine(scheduler)
    try:
        _always_eos(eng)
        eos = eng.tokenizer.eos_token_id
        stopped, ignored = await asyncio.gather(
            tokens(eng, "stop", PROMPT, SamplingParams(max_tokens=12, temperature=0.0)),
            tokens(eng, "ignore", PROMPT, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)))
        assert stopped == ([eos], "stop")
        assert ignored[1] == "length" and len(ignored[0]) == 12 and set(ignored[0]) == {eos}
    finally:
        await eng.shutdown()


@pytest.mark.asyncio
async def test_shutdown_joins_the_model_thread_and_ends_open_streams() -> None:
    eng = await _engine("continuous")
    got_one = asyncio.Event()

    async def consume() -> int:
        n = 0
        async for d in eng.generate("long", PROMPT, SamplingParams(max_tokens=200, ignore_eos=True)):
            n += len(d.token_ids)
            got_one.set()
        return n

    task = asyncio.create_task(consume())
    await got_one.wait()
    await eng.shutdown()
    assert not eng._continuous.alive()
    with pytest.raises(RuntimeError):  # the stream ends with an error, it does not hang
        await asyncio.wait_for(task, 10)
