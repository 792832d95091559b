"""Continuous batching for the transformers engine: sequences join and leave a running batch
between decode steps, as in vLLM, instead of waiting for a whole static `generate` to end.

One thread owns the model. Each iteration it (1) prefills the sequences that arrived since the
last step, as one left-padded batch, and samples their first tokens; (2) merges their KV cache
into the running batch's, left-padding the shorter side so every row's newest token sits in the
last column; (3) runs one decode step for all rows; (4) drops finished rows (EOS, max_tokens, a
stop string, an abort) and the leading columns that are padding in every row left. Positions come
from each row's own mask (`cumsum - 1`), so padding never shifts a row's RoPE positions, and the
2-D attention mask keeps padded columns out of attention — the same left-padding contract
`generate()` relies on.

Why not transformers' own `ContinuousBatchingManager`: its API changed between the 5.x releases
this project meets (5.17 on the GPU hosts, 5.19 here), it has no per-request seed, and it needs
paged-attention kernels. This loop runs any decoder whose cache is made of plain `DynamicLayer`s
(Llama, Qwen, Mistral without a sliding window...); `supports()` says whether a model qualifies,
and the engine falls back to static batching when it does not.

LoRA adapters (peft_adapters.py): one adapter (or none) per running batch. A sequence joins the
batch only if it runs the batch's adapter; when the oldest waiting sequence wants another, the
batch stops taking newcomers, drains, and the next batch starts with that adapter (FIFO, so no
adapter starves). Adapters are loaded and unloaded on this thread between steps (`AdapterCommand`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from deployments.llm.peft_adapters import AdapterCommand, PeftAdapters
from deployments.llm.sequence import Sequence

logger = logging.getLogger("genserve.llm.continuous")


def _cache_layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "layers", []))


def _plain_layers(cache: Any) -> bool:
    layers = _cache_layers(cache)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" and layer.keys is not None
                                for layer in layers)


class ContinuousBatcher:
    """The model thread. `submit` hands it a sequence; `stop` ends it. Thread-safe entry points only."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int,
                 on_step: Callable[[int], None] | None = None) -> None:
        self.model = model
        # Called on the model thread after every iteration with the rows its decode step ran (0:
        # none), and once at the end: the engine-core process sends the step's deltas out there.
        self._on_step = on_step
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_id or 0)
        self.max_batch = max_batch_size
        self.batch_sizes: deque[int] = deque(maxlen=256)  # rows of recent decode steps (stats, tests)
        self.failure: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[Sequence] = deque()  # arrived, not yet prefilled (the batch was full)
        self._rows: list[Sequence] = []  # the running batch, in cache row order
        self._cache: Any = None
        self._mask: Any = None  # [rows, width] long: 1 = real token, 0 = left padding
        self._last: Any = None  # [rows] long: each row's newest token, the next step's input
        self._stopping = False
        self.adapters = PeftAdapters(model)
        self._active: str | None = None  # the running batch's adapter
        self._commands: list[AdapterCommand] = []
        self._thread = threading.Thread(target=self._run, name="llm-continuous-batcher", daemon=True)

    # -- entry points (any thread) ------------------------------------------------------------

    @staticmethod
    def supports(model: Any) -> bool:
        """Whether the model's KV cache is one this loop can pad, merge and trim."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache()
        ids = torch.tensor([[1, 2]], device=model.device)
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True)
        return _plain_layers(cache)

    def start(self) -> None:
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        self._inbox.put(seq)

    def command(self, cmd: AdapterCommand) -> None:
        """Load or unload an adapter between steps; `cmd.done` is called on the model thread."""
        self._inbox.put(cmd)

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the loop after its current step and wait for the thread: a thread left inside a
        torch call while the interpreter exits aborts the process ("terminate called...")."""
        self._stopping = True
        self._inbox.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        """Block until the model thread ends (stopped, or died of a non-step error)."""
        self._thread.join()

    # -- the model thread ---------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                while not self._stopping:
                    self._collect(block=not self._rows and not self._waiting)
                    self._run_commands()
                    newcomers = self._admit()
                    decoded = 0
                    try:
                        if newcomers:
                            self._prefill(newcomers)
                        if self._rows:
                            decoded = len(self._rows)
                            self._decode()
                    except Exception as exc:  # one bad step fails its sequences, not the engine
                        logger.exception("step with %d rows failed", len(self._rows) + len(newcomers))
                        for s in {*self._rows, *newcomers}:
                            s.fail(exc)
                        self._reset()
                    if self._on_step is not None:
                        self._on_step(decoded)
        except BaseException as exc:
            self.failure = exc
            raise
        finally:  # stopped or failed: nothing still waiting may hang on its queue
            self._collect(block=False)
            gone = RuntimeError("the LLM engine stopped")
            for s in (*self._rows, *self._waiting):
                s.fail(self.failure or gone)
            for cmd in self._commands:  # nobody may wait forever on a load either
                cmd.done(f"the LLM engine stopped: {self.failure!r}")
            self._commands = []
            if self._on_step is not None:
                self._on_step(0)

    def _collect(self, *, block: bool) -> None:
        while True:
            try:
                seq = self._inbox.get(block=block)
            except queue.Empty:
                return
            if seq is None:
                return
            if isinstance(seq, AdapterCommand):
                self._commands.append(seq)
            else:
                self._waiting.append(seq)
            block = False

    def _run_commands(self) -> None:
        if not self._commands:
            return
        deferred = []
        for cmd in self._commands:
            if cmd.op == "unload" and any(s.adapter == cmd.adapter_id for s in (*self._rows, *self._waiting)):
                deferred.append(cmd)  # a sequence still runs it (e.g. aborted, not yet dropped)
                continue
            cmd.done(self.adapters.run(cmd))
        self._commands = deferred
        self.adapters.activate(self._active if self._rows else None)  # a load may have switched it

    def _admit(self) -> list[Sequence]:
        out: list[Sequence] = []
        while self._waiting and len(self._rows) + len(out) < self.max_batch:
            seq = self._waiting[0]
            if seq.aborted:
                self._waiting.popleft().finish("abort")
                continue
            if self._rows or out:
                if seq.adapter != self._active:
                    break  # one adapter per batch: its turn comes when this batch drains
            else:  # a new batch: it runs the oldest waiting sequence's adapter
                try:
                    self.adapters.activate(seq.adapter)
                except Exception as exc:  # not loaded (or PEFT refused): this sequence fails, not the loop
                    self._waiting.popleft().fail(exc)
                    continue
                self._active = seq.adapter
            out.append(self._waiting.popleft())
        return out

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._last = [], None, None, None

    def _prefill(self, seqs: list[Sequence]) -> None:
        import torch
        from transformers import DynamicCache

        device = self.model.device
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
            mask[i, width - len(s.prompt_ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        tokens = self._sample(out.logits[:, -1, :], seqs)
        self._join(seqs, cache, mask, tokens)
        self._emit(seqs, tokens.tolist())
        self._drop_finished()

    def _join(self, seqs: list[Sequence], cache: Any, mask: Any, tokens: Any) -> None:
        import torch
        import torch.nn.functional as F

        if not self._rows:
            self._rows, self._cache, self._mask, self._last = list(seqs), cache, mask, tokens
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def left_pad(t: Any, to: int, dim: int) -> Any:
            missing = to - t.shape[dim]
            if missing == 0:
                return t
            pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [missing, 0]  # F.pad lists the last dim first
            return F.pad(t, pad)

        for mine, theirs in zip(_cache_layers(self._cache), _cache_layers(cache), strict=True):
            mine.keys = torch.cat([left_pad(mine.keys, width, 2), left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([left_pad(mine.values, width, 2), left_pad(theirs.values, width, 2)])
        self._mask = torch.cat([left_pad(self._mask, width, 1), left_pad(mask, width, 1)])
        self._last = torch.cat([self._last, tokens])
        self._rows.extend(seqs)

    def _decode(self) -> None:
        import torch

        self.batch_sizes.append(len(self._rows))
        mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        out = self.model(input_ids=self._last[:, None], attention_mask=mask,
                         position_ids=mask.sum(-1, keepdim=True) - 1, past_key_values=self._cache, use_cache=True)
        self._mask = mask
        self._last = self._sample(out.logits[:, -1, :], self._rows)
        self._emit(self._rows, self._last.tolist())
        self._drop_finished()

    def _sample(self, logits: Any, seqs: list[Sequence]) -> Any:
        tokens = logits.argmax(-1)  # greedy rows; the others draw with their own generator
        for i, s in enumerate(seqs):
            token = s.sample(logits[i])
            if token is not None:
                tokens[i] = token
        return tokens

    def _emit(self, seqs: list[Sequence], tokens: list[int]) -> None:
        for s, tid in zip(seqs, tokens, strict=True):
            s.accept(tid, self.eos_id)

    def _drop_finished(self) -> None:
        """Remove finished rows from the batch, then the columns no row needs any more."""
        for s in self._rows:
            if s.finish_reason is None and s.aborted:
                s.finish("abort")
        keep = [i for i, s in enumerate(self._rows) if s.finish_reason is None]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset()
            return
        import torch

        idx = torch.tensor(keep, device=self._mask.device)
        self._rows = [self._rows[i] for i in keep]
        self._mask, self._last = self._mask[idx], self._last[idx]
        used = self._mask.sum(0).nonzero()
        start = int(used[0]) if len(used) else 0
        self._mask = self._mask[:, start:]
        for layer in _cache_layers(self._cache):
            layer.keys = layer.keys[idx, :, start:]
            layer.values = layer.values[idx, :, start:]
