"""One sequence as the transformers engine's model loop sees it, shared by its three users.

The in-process static batcher (transformers_engine.py), the continuous batcher (continuous.py)
and the engine-core process (core_process.py) all drive a `Sequence`: it takes the model's
tokens, detokenizes, applies stop strings and max_tokens, samples with its own generator, and
sends its deltas to a sink. It lives here, apart from all three, so they import it and not each
other (tests/test_architecture.py keeps deployments/ free of import cycles).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deployments.llm.detok import IncrementalDetokenizer
from deployments.llm.types import FinishReason, SamplingParams, TokenDelta


@dataclass(eq=False)
class Sequence:
    """One sequence as the model thread sees it. Its deltas (and a failure) go to `sink`: the
    consumer's asyncio queue in this process, or the engine-core process's outbox (core_process.py)."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    detok: IncrementalDetokenizer
    sink: Callable[[TokenDelta | BaseException], None]
    generator: Any = None  # torch.Generator
    adapter: str | None = None  # the LoRA adapter's id (None: the base model)
    aborted: bool = False
    finish_reason: FinishReason | None = None

    def push(self, delta: TokenDelta) -> None:
        self.sink(delta)

    def finish(self, reason: FinishReason, new_ids: tuple[int, ...] = ()) -> None:
        self.finish_reason = reason
        self.push(TokenDelta(self.detok.flush(), new_ids, reason))

    def accept(self, tid: int, eos_id: int | None) -> None:
        """One new token from the model: stream it, or end the sequence (abort, EOS, a stop
        string, max_tokens). No-op once finished."""
        if self.finish_reason is not None:
            return
        if self.aborted:
            self.finish("abort")
        elif tid == eos_id and not self.sampling.ignore_eos:
            self.detok.token_ids.append(tid)
            self.finish("stop", (tid,))
        else:
            text = self.detok.add(tid)
            if self.detok.stopped:
                self.finish("stop", (tid,))
            elif len(self.detok.token_ids) >= self.sampling.max_tokens:
                self.push(TokenDelta(text, (tid,)))
                self.finish("length")
            else:
                self.push(TokenDelta(text, (tid,)))

    def sample(self, scores: Any) -> Any:
        """This row's next token from its logits, with its own temperature, top_p and generator
        (so a seed fixes the sequence whatever shares its batch); None for greedy rows."""
        import torch

        t = self.sampling.temperature
        if t == 0:
            return None
        probs = torch.softmax(scores.float() / t, dim=-1)
        if self.sampling.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always the top token)
            drop = torch.cumsum(sorted_p, dim=-1) - sorted_p >= self.sampling.top_p
            sorted_p[drop] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return torch.multinomial(probs, 1, generator=self.generator)[0]

    def fail(self, exc: BaseException) -> None:
        """End the stream with an error (its consumer raises); no-op once finished."""
        if self.finish_reason is None:
            self.finish_reason = "abort"
            self.sink(exc)


def new_generator(device: Any, seed: int | None) -> Any:
    """A row's own torch.Generator: seeded, or from fresh entropy."""
    import torch

    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    return gen
