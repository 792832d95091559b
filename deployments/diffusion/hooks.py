"""Hooks around one pipeline call that are not about any one model family.

- `circular_padding`: seamless tiling, by making padded convs wrap around the image edges.
- `per_task_calls` (with `_take`/`_merge`): batch invariance, by running the heavy model calls
  once per task so a seed gives the same pixels alone or batched.
- `generators`: one seeded CPU generator per task (same starting noise on CPU and CUDA).
- `StopDenoising`: raised from a step callback to leave a pipeline early.
- `weighted_sum`: the multi-prompt rule, `sum(w_i * e_i) / sum(w_i)` over embedding tuples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.utils import BaseOutput

from deployments.diffusion.types import ImageTask


class StopDenoising(Exception):
    """Raised from a step callback to leave a pipeline that has no `_interrupt` flag."""


def generators(tasks: Sequence[ImageTask]) -> list[torch.Generator]:
    return [torch.Generator(device="cpu").manual_seed(t.seed) for t in tasks]


def weighted_sum(parts: Sequence[tuple[float, tuple[torch.Tensor, ...]]]) -> tuple[torch.Tensor, ...]:
    total = sum(w for w, _ in parts)
    n = len(parts[0][1])
    return tuple(sum(w * emb[i] for w, emb in parts) / total for i in range(n))  # type: ignore[misc]


@contextmanager
def circular_padding(modules: Sequence[torch.nn.Module], enabled: bool) -> Iterator[None]:
    """Seamless tiling: padded convs wrap around the image edges, restored on exit."""
    saved: list[tuple[torch.nn.Conv2d, str]] = []
    if enabled:
        for module in modules:
            for conv in module.modules():
                if isinstance(conv, torch.nn.Conv2d) and any(p > 0 for p in conv.padding):
                    saved.append((conv, conv.padding_mode))
                    conv.padding_mode = "circular"
    try:
        yield
    finally:
        for conv, mode in saved:
            conv.padding_mode = mode


def _take(value: Any, rows: list[int], n: int) -> Any:
    """`value` with only `rows` of every tensor whose first dimension is the batch (`n`)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() > 0 and value.shape[0] == n else value
    if isinstance(value, (tuple, list)):
        return type(value)(_take(v, rows, n) for v in value)
    if isinstance(value, dict):
        return {k: _take(v, rows, n) for k, v in value.items()}
    return value


def _merge(outs: list[Any], order: torch.Tensor) -> Any:
    """Concatenate per-task outputs and put the rows back in the batch's order."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs)[order]
    if isinstance(first, BaseOutput):
        return type(first)(**{k: _merge([o[k] for o in outs], order) for k in first.keys()})
    if isinstance(first, tuple):
        return tuple(_merge([o[i] for o in outs], order) for i in range(len(first)))
    return first


@contextmanager
def per_task_calls(module: torch.nn.Module, method: str, n_tasks: int) -> Iterator[None]:
    """Run `module.<method>` once per task, on exactly the rows that task would have alone.

    CPU kernels pick different code paths by batch size (oneDNN conv algorithms, MKL's small-M
    GEMM, thread splits, channels-last GroupNorm at N=1), so the same row computed in a batch of
    1 and of 4 differs in the last bits, and after rounding to uint8 about one pixel value in a
    few hundred moves by 1. Feeding each task's rows (its own, or its [cond, uncond] pair under
    guidance) as their own call gives every task the shapes of a lone run: batch-invariant by
    construction. Everything between these calls (scheduler steps, guidance) is elementwise.
    """
    original = getattr(module, method)

    def per_task(*args: Any, **kwargs: Any) -> Any:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        n = first.shape[0] if first is not None and first.dim() > 0 else 0
        if n_tasks == 1 or n not in (n_tasks, 2 * n_tasks):
            return original(*args, **kwargs)
        groups = [[i] if n == n_tasks else [i, n_tasks + i] for i in range(n_tasks)]
        outs = [original(*_take(args, g, n), **_take(kwargs, g, n)) for g in groups]
        order = torch.argsort(torch.tensor([i for g in groups for i in g]))
        return _merge(outs, order.to(first.device))

    setattr(module, method, per_task)  # instance attribute shadows the class's method
    try:
        yield
    finally:
        delattr(module, method)
