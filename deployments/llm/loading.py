"""Loading a causal LM and its tokenizer (from a hub id or a local dir) for the transformers engine,
in the replica (static batching) or in the engine-core process (core_process.py)."""

from __future__ import annotations

from typing import Any


def load_model(path: str, *, dtype: str, device: str, max_model_len: int) -> tuple[Any, Any]:
    """The model (eval, on its device) and tokenizer from a hub id or a local dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "auto"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max_model_len > limit:
        raise ValueError(f"max_model_len ({max_model_len}) exceeds the model's "
                         f"max_position_embeddings ({limit}) for {path!r}")
    # transformers types `to` through a decorator that loses `self`: mypy takes `device` for the model.
    return model.to(device).eval(), tokenizer  # type: ignore[arg-type]
