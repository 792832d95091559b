"""The vocabulary between the ingress, the LLM deployment and its engines.

Plain dataclasses (no torch, no vLLM): they cross the Serve handle through Ray's serializer, and
the ingress imports them without loading any model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """Engine-neutral sampling parameters of one sequence. temperature 0 means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class TokenDelta:
    """What an engine yields for one sequence: new text, the token ids behind it, and
    `finish_reason` on the last delta. `text` may lag `token_ids` (held-back partial UTF-8 or a
    possible stop-string prefix); the last delta flushes it."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class LoRAAdapter:
    """A LoRA adapter one request runs with: a PEFT directory (adapter_config.json +
    adapter_model.safetensors).

    `id` is unique per adapter content (the registry's content-addressed id), so it is both Serve's
    multiplexed model id (requests for it go to replicas that hold it) and the engine's adapter
    name. `path`: a directory readable on the replica's node; empty (what the ingress sends), the
    replica fetches the adapter by id from its `AdapterSource` (adapters.py). `name` is what the
    client asked for (messages, logs)."""

    id: str
    path: str = ""
    name: str = ""
    rank: int = 0  # 0: not known (read from adapter_config.json)

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("a LoRA adapter needs an id")


@dataclass(frozen=True)
class GenerationRequest:
    """One chat or completion call as the deployment receives it.

    Exactly one of `prompt` (completions) and `messages` (chat: role/content dicts) is set.
    The replica turns the sampling fields into one `SamplingParams` per choice once it knows the
    prompt's length (choice i gets seed + i, so n > 1 choices differ yet reproduce).
    """

    request_id: str
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    n: int = 1
    # None: use the model's default_max_tokens (capped by what is left of the context).
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    adapter: LoRAAdapter | None = None  # None: the base model
    # W3C `traceparent` + request id/tenant of the caller (telemetry.tracing.outgoing).
    trace_context: dict[str, str] | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of prompt and messages must be set")
        if not 1 <= self.n <= 16:
            raise ValueError(f"n must be in [1, 16], got {self.n}")


@dataclass(frozen=True)
class Started:
    """The first item of every stream: the request passed validation and is queued."""

    request_id: str
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class ChoiceDelta:
    """A delta of choice `index` of a request (n > 1 interleaves choices)."""

    index: int
    text: str
    num_tokens: int
    finish_reason: FinishReason | None = None
    # The whole request's GPU-seconds so far (cumulative, all choices; share_clock.py): the
    # ingress meters the latest value it sent, so a stream cut short is billed what it used.
    gpu_seconds: float = 0.0


StreamItem = Started | ChoiceDelta


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: FinishReason | None
    num_tokens: int


@dataclass
class GenerationResult:
    """A whole (non-streamed) result, aggregated from the same stream a streamed call sees."""

    request_id: str
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    gpu_seconds: float = 0.0  # the replica's share-clock GPU-seconds of this request (share_clock.py)


class LLMRequestError(ValueError):
    """A request the model can't serve as asked (too long for the context, ...).

    Carries the HTTP status the ingress should answer with; raised inside the replica, it reaches
    the ingress wrapped by Ray (`RayTaskError`, still an instance of this class, `.cause` set).
    """

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str = "invalid_value") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:  # keyword-only args: pickle through a plain tuple
        return (_rebuild_error, (self.status, self.message, self.param, self.code))


def _rebuild_error(status: int, message: str, param: str | None, code: str) -> LLMRequestError:
    return LLMRequestError(status, message, param=param, code=code)
