"""The transformers engine: the fallback LLM engine where vLLM is absent.

Two schedulers. `continuous` (the default, deployments/llm/continuous.py): sequences join and
leave the running batch between decode steps, so a request never waits for another's answer to
end. Its model thread runs in a child process by default (`engine_process`, core_process.py), so
it neither waits for nor delays the replica's event loop; this process keeps the tokenizer.
`static`, kept for models whose cache is not made of plain `DynamicLayer`s after a probe
forward (the engine then falls back to it by itself) and as the measured baseline: micro-batched
`model.generate` with per-row sampling and stopping, described below.

Static: requests that arrive within `batch_wait_ms` of each other (up to `max_batch_size`) share one
left-padded `generate` call running in a worker thread; the next batch starts when it ends
(static batching: vLLM does continuous batching, this is the fallback for hosts without it).
After a batch of k rows ends, up to k requests are expected back soon (their clients read the
answer and ask again): the next batch waits up to `regroup_wait_ms` after the last one ended for
them. Without that, one late arrival splits the group and every later batch runs partly empty —
measured on an H100 behind Serve at 4 clients: 0.55x the direct tokens/s, TTFT p50 2.8 s. Through
Serve the clients come back 20–60 ms after their last token (50 ms still split the group), and a
request that misses a static batch waits a whole generation (seconds), so the window is 150 ms.
`generate` runs greedy; sampling happens in `_RowSampler`, a logits processor that draws each
row's token with that row's own `torch.Generator`, so a seed fixes a sequence whatever else
shares its batch. `_RowStopper` (checked every step) ends rows that hit EOS, their max_tokens, a
stop string, or an abort, so an aborted request stops decoding at the next step.

LoRA adapters (PEFT, peft_adapters.py) need the continuous scheduler: it runs one adapter per
batch and loads adapters between steps. The static fallback refuses them (`load_adapter` raises).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import deque
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from deployments.llm.continuous import ContinuousBatcher
from deployments.llm.core_process import EngineCoreClient, UnsupportedModel
from deployments.llm.detok import IncrementalDetokenizer
from deployments.llm.loading import load_model
from deployments.llm.peft_adapters import AdapterCommand
from deployments.llm.sequence import Sequence, new_generator
from deployments.llm.types import LoRAAdapter, SamplingParams, TokenDelta

logger = logging.getLogger("genserve.llm.transformers")


def queue_sink(loop: asyncio.AbstractEventLoop, q: asyncio.Queue) -> Callable[[Any], None]:
    """A sink the model thread can call: the item lands in `q` on `loop`'s thread."""

    def sink(item: Any) -> None:
        loop.call_soon_threadsafe(q.put_nowait, item)

    return sink


class TransformersEngine:
    name = "transformers"

    def __init__(
        self,
        model: str,
        *,
        max_model_len: int = 2048,
        dtype: str = "auto",
        device: str = "auto",
        max_batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        regroup_wait_ms: float = 150.0,
        scheduler: str = "continuous",
        gil_switch_interval_ms: float | None = None,
        engine_process: bool | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if scheduler not in ("continuous", "static"):
            raise ValueError(f"scheduler must be 'continuous' or 'static', got {scheduler!r}")
        if engine_process and scheduler != "continuous":
            raise ValueError("engine_process needs the continuous scheduler")
        self.scheduler = scheduler
        # The model loop in its own process (core_process.py); None: yes for the continuous
        # scheduler, falling back to in-process static batching where the core cannot run the model.
        self._process_auto = engine_process is None
        self.engine_process = scheduler == "continuous" if engine_process is None else engine_process
        # The model thread launches kernels from Python and holds the GIL most of the time; the
        # replica's event loop (requests in, tokens out) waits up to one switch interval (5 ms by
        # default) for it at every hand-off. A shorter interval is process-wide, hence opt-in.
        self._switch_interval_s = None if gil_switch_interval_ms is None else gil_switch_interval_ms / 1000
        self.model_path = model
        self.max_model_len = max_model_len
        self._dtype = dtype
        self._device = device
        self._max_batch = max_batch_size
        self._wait_s = batch_wait_ms / 1000
        self._regroup_s = regroup_wait_ms / 1000
        self._last_batch = 0  # rows of the batch that ended last: how many requests to expect back
        self._last_end = float("-inf")  # when it ended (loop time)
        self._static_batches: deque[int] = deque(maxlen=256)  # recent static batches' rows
        self._continuous: ContinuousBatcher | None = None
        self._live: dict[str, Sequence] = {}  # request id -> its sequence, while it streams
        self._pending: list[Sequence] = []
        self._batch: list[Sequence] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._failure: BaseException | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._core: EngineCoreClient | None = None
        self._remote: dict[str, asyncio.Queue] = {}  # request id -> its deltas from the core process
        self._core_batches: deque[int] = deque(maxlen=256)
        self._adapter_replies: dict[str, list[asyncio.Future]] = {}  # adapter id -> loads/unloads awaiting the core

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def batch_sizes(self) -> deque[int]:
        """Rows of recent batches: per decode step (continuous) or per `generate` call (static)."""
        if self._core is not None:
            return self._core_batches
        return self._continuous.batch_sizes if self._continuous is not None else self._static_batches

    async def start(self) -> None:
        if self.engine_process:
            try:
                await self._start_core()
                return
            except UnsupportedModel:
                if not self._process_auto:
                    raise
                logger.warning("%s: its KV cache is not made of plain dynamic layers; using static batching "
                               "in this process", self.model_path)
                self._core, self.engine_process, self.scheduler = None, False, "static"
        if self._switch_interval_s is not None:
            sys.setswitchinterval(self._switch_interval_s)
        await asyncio.to_thread(self._load)
        if self.scheduler == "continuous":
            if await asyncio.to_thread(ContinuousBatcher.supports, self._model):
                self._continuous = ContinuousBatcher(self._model, self._tokenizer, max_batch_size=self._max_batch)
                self._continuous.start()
                return
            logger.warning("%s: its KV cache is not made of plain dynamic layers; using static batching",
                           self.model_path)
            self.scheduler = "static"
        self._loop_task = asyncio.create_task(self._schedule())

    async def _start_core(self) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_path)
        self._core = EngineCoreClient(self._on_core_step, self._on_core_exit, self._on_core_adapter)
        info = await self._core.start(dict(
            model=self.model_path, dtype=self._dtype, device=self._device, max_model_len=self.max_model_len,
            max_batch_size=self._max_batch, gil_switch_interval_ms=None if self._switch_interval_s is None
            else self._switch_interval_s * 1000))
        logger.info("%s: engine core process %s on %s", self.model_path, info["pid"], info["device"])

    def _on_core_step(self, rows: int, items: list) -> None:
        if rows:
            self._core_batches.append(rows)
        for rid, item in items:
            q = self._remote.get(rid)
            if q is not None:
                q.put_nowait(RuntimeError(item) if isinstance(item, str) else item)

    def _on_core_exit(self, why: str) -> None:
        self._failure = RuntimeError(why)
        for q in self._remote.values():
            q.put_nowait(RuntimeError(why))
        for adapter_id in list(self._adapter_replies):
            self._on_core_adapter(adapter_id, why)

    def _on_core_adapter(self, adapter_id: str, error: str | None) -> None:
        waiting = self._adapter_replies.get(adapter_id)
        if not waiting:
            return
        fut = waiting.pop(0)  # the core runs one adapter's commands in order
        if not waiting:
            del self._adapter_replies[adapter_id]
        if not fut.done():
            fut.set_result(error)

    # -- LoRA adapters (PEFT; one adapter per batch) ----------------------------------------

    async def load_adapter(self, adapter: LoRAAdapter) -> None:
        await self._adapter_command(AdapterCommand("load", adapter.id, adapter.path))

    async def unload_adapter(self, adapter_id: str) -> None:
        await self._adapter_command(AdapterCommand("unload", adapter_id))

    async def _adapter_command(self, cmd: AdapterCommand) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        if self._core is not None:
            self._core.send((f"{cmd.op}_adapter", cmd.adapter_id, cmd.path))
            # After the send: the reply comes through this loop, so it can't arrive before this line.
            self._adapter_replies.setdefault(cmd.adapter_id, []).append(fut)
        elif self._continuous is not None:
            def settle(error: str | None) -> None:
                if not fut.done():
                    fut.set_result(error)

            def done(error: str | None) -> None:  # on the model thread
                loop.call_soon_threadsafe(settle, error)

            cmd.done = done
            self._continuous.command(cmd)
        else:
            raise RuntimeError("LoRA adapters need the transformers engine's continuous scheduler "
                               f"(this model runs the {self.scheduler!r} one)")
        error = await fut
        if error is not None:
            raise RuntimeError(f"LoRA adapter {cmd.adapter_id!r}: {cmd.op} failed: {error}")

    async def _generate_in_core(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                                adapter: str | None) -> AsyncGenerator[TokenDelta, None]:
        assert self._core is not None
        deltas: asyncio.Queue = asyncio.Queue()
        self._remote[request_id] = deltas
        finished = False
        try:
            self._core.send(("add", request_id, list(prompt_token_ids), sampling, adapter))
            while True:
                delta = await deltas.get()
                if isinstance(delta, BaseException):
                    finished = True  # the core ended it (or is gone): nothing to abort
                    raise RuntimeError(f"generation failed for {request_id!r}") from delta
                yield delta
                if delta.finish_reason is not None:
                    finished = True
                    return
        finally:
            self._remote.pop(request_id, None)
            if not finished and self._core.alive():  # early close (client gone): stop decoding it
                self._core.send(("abort", request_id))

    def _load(self) -> None:
        self._model, self._tokenizer = load_model(self.model_path, dtype=self._dtype, device=self._device,
                                                  max_model_len=self.max_model_len)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, adapter: str | None = None
    ) -> AsyncGenerator[TokenDelta, None]:
        if self._core is not None:
            if self._failure is not None:
                raise RuntimeError(f"transformers engine failed: {self._failure!r}")
            # aclosing: closing this stream (client gone) must close the inner one now (its abort).
            async with aclosing(self._generate_in_core(request_id, prompt_token_ids, sampling, adapter)) as deltas:
                async for delta in deltas:
                    yield delta
            return
        if self._model is None:
            raise RuntimeError("engine not started: call start() first")
        failure = self._failure or (self._continuous.failure if self._continuous is not None else None)
        if failure is not None:
            raise RuntimeError(f"transformers engine failed: {failure!r}")
        if adapter is not None and self._continuous is None:
            raise RuntimeError("LoRA adapters need the transformers engine's continuous scheduler")
        queue: asyncio.Queue = asyncio.Queue()
        seq = Sequence(request_id, list(prompt_token_ids), sampling,
                   IncrementalDetokenizer(self._tokenizer, sampling.stop),
                   queue_sink(asyncio.get_running_loop(), queue),
                   generator=new_generator(self._model.device, sampling.seed), adapter=adapter)
        self._live[request_id] = seq
        if self._continuous is not None:
            self._continuous.submit(seq)
        else:
            self._pending.append(seq)
            self._wake.set()
        try:
            while True:
                delta = await queue.get()
                if isinstance(delta, BaseException):
                    raise RuntimeError(f"generation failed for {request_id!r}") from delta
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if self._live.get(request_id) is seq:
                del self._live[request_id]
            # Early close (client gone, CancelledError): stop decoding this row.
            if seq.finish_reason is None:
                seq.aborted = True
                if seq in self._pending:
                    self._pending.remove(seq)

    async def abort(self, request_id: str) -> None:
        if self._core is not None:
            if request_id in self._remote and self._core.alive():
                self._core.send(("abort", request_id))  # its stream ends with finish_reason "abort"
            return
        seq = self._live.get(request_id)
        if seq is None or seq.finish_reason is not None:
            return
        seq.aborted = True  # the model thread ends it at its next step
        if seq in self._pending:
            self._pending.remove(seq)
            seq.finish("abort")

    def num_running(self) -> int:
        if self._core is not None:
            return len(self._remote)
        if self._continuous is not None:  # submitted ones too: the model thread may not have seen them yet
            return sum(1 for s in self._live.values() if s.finish_reason is None)
        return len(self._pending) + sum(1 for s in self._batch if s.finish_reason is None)

    async def check_health(self) -> None:
        if self._core is not None:
            if not self._core.alive():
                raise RuntimeError(f"transformers engine core stopped: {self._core.exited}")
            return
        if self._model is None:
            raise RuntimeError("transformers engine not started")
        if self._continuous is not None:
            if self._continuous.failure is not None or not self._continuous.alive():
                raise RuntimeError(f"transformers engine batcher stopped: {self._continuous.failure!r}")
            return
        if self._failure is not None or (self._loop_task is not None and self._loop_task.done()):
            raise RuntimeError(f"transformers engine scheduler stopped: {self._failure!r}")

    async def shutdown(self) -> None:
        if self._core is not None:
            await self._core.stop()
        if self._continuous is not None:
            await asyncio.to_thread(self._continuous.stop)
        if self._loop_task is not None:
            self._loop_task.cancel()

    async def _schedule(self) -> None:
        try:
            while True:
                while not self._pending:
                    self._wake.clear()
                    await self._wake.wait()
                await self._gather()
                batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch:]
                batch = [s for s in batch if not s.aborted]
                if not batch:
                    continue
                self._batch = batch
                self._static_batches.append(len(batch))
                try:
                    await asyncio.to_thread(self._run_batch, batch)
                except Exception as exc:  # one bad batch fails its requests, not the engine
                    logger.exception("batch of %d failed", len(batch))
                    for s in batch:
                        s.fail(exc)
                finally:
                    self._batch = []
                    self._last_batch, self._last_end = len(batch), asyncio.get_running_loop().time()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._failure = exc
            raise

    async def _gather(self) -> None:
        """Wait for the batch to fill: within `regroup_wait_ms` of the last batch's end, for as many
        requests as it had; otherwise for a burst (`batch_wait_ms`); never past `max_batch_size`."""
        loop = asyncio.get_running_loop()
        regroup_until = self._last_end + self._regroup_s
        expected = min(self._max_batch, self._last_batch) if loop.time() < regroup_until else 0
        if len(self._pending) < expected:
            deadline, target = regroup_until, expected
        else:
            deadline, target = loop.time() + self._wait_s, self._max_batch
        while len(self._pending) < target:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    def _run_batch(self, batch: list[Sequence]) -> None:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        tok = self._tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(s.prompt_ids) for s in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, s in enumerate(batch):  # left padding: every row's next token is at the end
            ids[i, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
            mask[i, width - len(s.prompt_ids):] = 1
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=max(s.sampling.max_tokens for s in batch),
            # No EOS for generate itself: _Rows ends each row (EOS unless ignore_eos, stop, length)
            # and _RowStopper tells generate which rows are done.
            eos_token_id=[],  # not None: None is filled in from the model's generation_config
            pad_token_id=pad,
        )
        rows = _Rows(batch, tok.eos_token_id)
        with torch.inference_mode():
            self._model.generate(
                input_ids=ids.to(self._model.device),
                attention_mask=mask.to(self._model.device),
                generation_config=config,
                logits_processor=LogitsProcessorList([_RowSampler(batch)]),
                stopping_criteria=StoppingCriteriaList([_RowStopper(rows)]),
                streamer=rows,
            )
        for s in batch:  # generate ended (all rows done, or its own max length)
            if s.finish_reason is None:
                s.finish("abort" if s.aborted else "length")


class _Rows:
    """The streamer: receives each step's tokens (one per row) and decides which rows are done."""

    def __init__(self, batch: list[Sequence], eos_id: int | None) -> None:
        self.batch = batch
        self.eos_id = eos_id
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        for s, tid in zip(self.batch, value.reshape(-1).tolist(), strict=False):
            s.accept(tid, self.eos_id)

    def end(self) -> None:
        pass

    def done_mask(self) -> list[bool]:
        for s in self.batch:
            if s.finish_reason is None and s.aborted:
                s.finish("abort")
        return [s.finish_reason is not None for s in self.batch]


class _RowStopper:
    def __init__(self, rows: _Rows) -> None:
        self.rows = rows

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.tensor(self.rows.done_mask(), dtype=torch.bool, device=input_ids.device)


class _RowSampler:
    """Samples each row with its own temperature/top_p/generator; greedy rows are left as is."""

    def __init__(self, batch: list[Sequence]) -> None:
        self.batch = batch

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        for i, s in enumerate(self.batch):
            if s.finish_reason is not None:
                continue
            token = s.sample(scores[i])
            if token is None:  # greedy: generate's own argmax
                continue
            row = torch.full_like(scores[i], float("-inf"))
            row[token] = 0.0
            scores[i] = row
        return scores
