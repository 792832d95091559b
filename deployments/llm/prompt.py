"""From a request to what an engine takes: prompt token ids (chat template applied) and one
`SamplingParams` per choice, checked against the model's context. Pure functions of the tokenizer
and the request, so the vLLM and the transformers engine count tokens the same way."""

from __future__ import annotations

from typing import Any

from deployments.llm.types import GenerationRequest, LLMRequestError, SamplingParams

ROLES = ("system", "user", "assistant", "developer", "tool")


def prompt_token_ids(tokenizer: Any, req: GenerationRequest) -> list[int]:
    if req.messages is not None:
        for i, m in enumerate(req.messages):
            if m.get("role") not in ROLES:
                raise LLMRequestError(400, f"messages[{i}].role must be one of {list(ROLES)}, "
                                      f"got {m.get('role')!r}", param=f"messages[{i}].role")
        # `developer` is OpenAI's new name for `system`; chat templates know only the latter.
        msgs = [{"role": "system" if m["role"] == "developer" else m["role"],
                 "content": m.get("content") or ""} for m in req.messages]
        out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return [int(t) for t in ids]
    return [int(t) for t in tokenizer(req.prompt)["input_ids"]]


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def sampling_params(req: GenerationRequest, prompt_len: int, *, context: int,
                    default_max_tokens: int) -> list[SamplingParams]:
    """One per choice (seeds seed, seed+1, ...); a prompt or max_tokens that doesn't fit `context`
    is the caller's error (413 / 400), with the numbers."""
    param = "messages" if req.messages is not None else "prompt"
    if prompt_len >= context:
        raise LLMRequestError(
            413, f"The prompt is {prompt_len} tokens long; this model's context is {context} tokens "
            f"(including the answer). Shorten the {param}.", param=param, code="context_length_exceeded")
    room = context - prompt_len
    if req.max_tokens is not None and req.max_tokens > room:
        raise LLMRequestError(
            400, f"max_tokens ({req.max_tokens}) plus the prompt ({prompt_len} tokens) exceeds this "
            f"model's context of {context} tokens; at most {room} tokens can be generated.",
            param="max_tokens", code="context_length_exceeded")
    max_tokens = req.max_tokens if req.max_tokens is not None else min(default_max_tokens, room)
    return [
        SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                       stop=req.stop, seed=None if req.seed is None else req.seed + i,
                       ignore_eos=req.ignore_eos)
        for i in range(req.n)
    ]
