"""OpenAI-compatible request and response models for /v1/chat/completions and /v1/completions.

Requests validate what needs no tokenizer (roles, ranges, non-empty messages) and convert
themselves into the deployment's `GenerationRequest` (`to_generation_request`); what needs the
tokenizer (prompt vs context) is checked in the LLM replica. Unknown fields are ignored, as
OpenAI's client sends some we don't use (e.g. `logprobs: null`).
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.llm.types import GenerationRequest

Role = Literal["system", "developer", "user", "assistant", "tool"]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Role
    # A string, or OpenAI's list of content parts (text parts only: this API has no vision model).
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate per choice.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    # vLLM's extra parameter (benchmarks, load tests): keep generating past EOS up to max_tokens.
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _sampling_kwargs(self) -> dict:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return dict(n=self.n, max_tokens=self.max_tokens, temperature=self.temperature,
                    top_p=self.top_p, stop=stop, seed=self.seed, ignore_eos=self.ignore_eos)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    # Newer clients send max_completion_tokens instead of max_tokens.
    max_completion_tokens: int | None = Field(None, ge=1)

    def to_generation_request(self, request_id: str) -> GenerationRequest:
        kwargs = self._sampling_kwargs()
        if kwargs["max_tokens"] is None:
            kwargs["max_tokens"] = self.max_completion_tokens
        msgs = tuple({"role": m.role, "content": m.text()} for m in self.messages)
        return GenerationRequest(request_id=request_id, messages=msgs, **kwargs)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] = Field(description="One prompt (a one-element list is accepted).")
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError(f"exactly one prompt per request is supported, got {len(v)}")
        # An empty prompt leaves the engine nothing to continue from (it was a 500 there).
        if (v if isinstance(v, str) else v[0]) == "":
            raise ValueError("prompt must not be empty")
        return v

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def to_generation_request(self, request_id: str) -> GenerationRequest:
        return GenerationRequest(request_id=request_id, prompt=self.prompt_text, **self._sampling_kwargs())


# -- responses ------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


def finish_reason_for_api(reason: str | None) -> str | None:
    # OpenAI has no "abort"; an aborted choice only reaches a client if the engine stopped it.
    return "stop" if reason == "abort" else reason
