"""The LLM replica's logic, engine-agnostic and Ray-free (deployment.py wraps it for Serve).

It renders chat messages with the model's chat template, counts tokens, checks the request
against the context, fans `n` out into n engine sequences and merges their deltas into one
stream. The first item of every stream is `Started`: a caller that awaits it knows the request
was accepted (or gets the `LLMRequestError`) before it commits to an HTTP status.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import Any, AsyncIterator

from deployments.llm import share_clock
from deployments.llm.engine import LLMEngine
from deployments.llm.types import (
    Choice,
    ChoiceDelta,
    GenerationRequest,
    GenerationResult,
    LLMRequestError,
    SamplingParams,
    Started,
    StreamItem,
)

ROLES = ("system", "user", "assistant", "developer", "tool")


class LLMServer:
    def __init__(self, engine: LLMEngine, *, model_name: str, default_max_tokens: int = 256) -> None:
        self.engine = engine
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self._started = False

    async def start(self) -> None:
        if not self._started:
            await self.engine.start()
            self._started = True

    # -- prompt handling ------------------------------------------------------------------

    def prompt_token_ids(self, req: GenerationRequest) -> list[int]:
        tok = self.engine.tokenizer
        if req.messages is not None:
            for i, m in enumerate(req.messages):
                if m.get("role") not in ROLES:
                    raise LLMRequestError(400, f"messages[{i}].role must be one of {list(ROLES)}, "
                                          f"got {m.get('role')!r}", param=f"messages[{i}].role")
            # `developer` is OpenAI's new name for `system`; chat templates know only the latter.
            msgs = [{"role": "system" if m["role"] == "developer" else m["role"],
                     "content": m.get("content") or ""} for m in req.messages]
            out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if hasattr(out, "keys") else out
            return [int(t) for t in ids]
        return [int(t) for t in tok(req.prompt)["input_ids"]]

    def count_tokens(self, text: str) -> int:
        return len(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _sampling(self, req: GenerationRequest, prompt_len: int) -> list[SamplingParams]:
        ctx = self.engine.max_model_len
        param = "messages" if req.messages is not None else "prompt"
        if prompt_len >= ctx:
            raise LLMRequestError(
                413, f"The prompt is {prompt_len} tokens long; this model's context is {ctx} tokens "
                f"(including the answer). Shorten the {param}.", param=param, code="context_length_exceeded")
        room = ctx - prompt_len
        if req.max_tokens is not None and req.max_tokens > room:
            raise LLMRequestError(
                400, f"max_tokens ({req.max_tokens}) plus the prompt ({prompt_len} tokens) exceeds this "
                f"model's context of {ctx} tokens; at most {room} tokens can be generated.",
                param="max_tokens", code="context_length_exceeded")
        max_tokens = req.max_tokens if req.max_tokens is not None else min(self.default_max_tokens, room)
        return [
            SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                           stop=req.stop, seed=None if req.seed is None else req.seed + i,
                           ignore_eos=req.ignore_eos)
            for i in range(req.n)
        ]

    # -- generation -----------------------------------------------------------------------

    async def stream(self, req: GenerationRequest) -> AsyncIterator[StreamItem]:
        """Started, then ChoiceDeltas of all n choices as they come (each ends with a finish_reason).
        Each delta carries the request's GPU-seconds so far (share_clock.py); the last one the total."""
        ids = self.prompt_token_ids(req)
        params = self._sampling(req, len(ids))
        yield Started(req.request_id, len(ids), params[0].max_tokens)
        # On the clock from here until the stream ends, however it ends (finally: leave).
        share = share_clock.clock_for(self).enter(len(params))
        try:
            if len(params) == 1:
                # aclosing: an early close must reach the engine now (abort), not at garbage collection.
                async with aclosing(self.engine.generate(req.request_id, ids, params[0])) as deltas:
                    async for d in deltas:
                        if d.finish_reason is not None:
                            share.leave()  # the last delta carries the final figure
                        yield ChoiceDelta(0, d.text, len(d.token_ids), d.finish_reason, share.gpu_seconds())
                return
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(i: int, sp: SamplingParams) -> None:
                try:
                    async with aclosing(self.engine.generate(f"{req.request_id}-{i}", ids, sp)) as deltas:
                        async for d in deltas:
                            await queue.put(ChoiceDelta(i, d.text, len(d.token_ids), d.finish_reason))
                except BaseException as exc:  # surfaced to the consumer, then re-raised there
                    await queue.put(exc)
                    raise

            tasks = [asyncio.create_task(pump(i, sp)) for i, sp in enumerate(params)]
            try:
                done = 0
                while done < len(tasks):
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    if item.finish_reason is not None:
                        done += 1
                        if done == len(tasks):
                            share.leave()
                    yield ChoiceDelta(item.index, item.text, item.num_tokens, item.finish_reason, share.gpu_seconds())
            finally:
                for t in tasks:  # early close or failure: abort the other choices too
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            share.leave()

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        """The whole result, aggregated from `stream` (so streamed and not agree by construction)."""
        t0 = time.perf_counter()
        texts: dict[int, list[str]] = {i: [] for i in range(req.n)}
        counts = [0] * req.n
        reasons: list[Any] = [None] * req.n
        prompt_tokens = 0
        ttft = None
        gpu_seconds = 0.0
        async for item in self.stream(req):
            if isinstance(item, Started):
                prompt_tokens = item.prompt_tokens
                continue
            if ttft is None and item.num_tokens:
                ttft = time.perf_counter() - t0
            texts[item.index].append(item.text)
            counts[item.index] += item.num_tokens
            reasons[item.index] = item.finish_reason or reasons[item.index]
            gpu_seconds = max(gpu_seconds, item.gpu_seconds)
        choices = [Choice(i, "".join(texts[i]), reasons[i], counts[i]) for i in range(req.n)]
        return GenerationResult(req.request_id, choices, prompt_tokens, sum(counts),
                                {"total_s": time.perf_counter() - t0, "ttft_s": ttft or 0.0}, gpu_seconds)

    def stats(self) -> dict[str, Any]:
        out = {"model": self.model_name, "engine": self.engine.name, "running": self.engine.num_running(),
               "max_model_len": self.engine.max_model_len}
        if hasattr(self.engine, "batch_sizes"):  # the transformers engine's recent batches (rows)
            out["recent_batch_sizes"] = list(self.engine.batch_sizes)[-32:]
        if hasattr(self.engine, "scheduler"):
            out["scheduler"] = self.engine.scheduler
            out["engine_process"] = self.engine.engine_process
        return out

    async def check_health(self) -> None:
        await self.engine.check_health()
