"""Hooks around one pipeline call that are not about any one model family.

- `circular_padding`: seamless tiling, by making padded convs wrap around the image edges.
- `per_task_calls` (with `_take`/`_merge`): batch invariance, by running the heavy model calls
  once per task so a seed gives the same pixels alone or batched.
- `generators`: one seeded CPU generator per task (same starting noise on CPU and CUDA).
- `StopDenoising`: raised from a step callback to leave a pipeline early.
- `LiveRows`: which tasks of a group are still denoising (a cancelled one leaves at a step).
- `weighted_sum`: the multi-prompt rule, `sum(w_i * e_i) / sum(w_i)` over embedding tuples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from diffusers.utils import BaseOutput

from deployments.diffusion.types import ImageTask


class StopDenoising(Exception):
    """Raised from a step callback to leave a pipeline that has no `_interrupt` flag."""


class LiveRows:
    """The tasks of one group still in its batch, as indices into the group's task list, in row
    order. A family that can shrink its batch mid-loop (SDXL) asks `leaving()` after each step and
    drops those rows (latents, embeddings, generators), so a cancelled task stops costing compute
    at once while the others continue with exactly the values they would have had."""

    def __init__(self, n: int, cancelled: dict[int, str]) -> None:
        self.live = list(range(n))
        self._cancelled = cancelled  # task index -> where it was cancelled (filled by the engine)

    def __len__(self) -> int:
        return len(self.live)

    def leaving(self) -> list[int] | None:
        """Row positions to keep when some live task was cancelled since the last call (the
        list is applied to `live` here), else None. Never empties the batch: when every task is
        cancelled the engine stops the whole call instead."""
        keep = [pos for pos, i in enumerate(self.live) if i not in self._cancelled]
        if len(keep) == len(self.live) or not keep:
            return None
        self.live = [self.live[pos] for pos in keep]
        return keep


def take_rows(value: Any, keep: list[int], n: int) -> Any:
    """`value` with only the rows `keep` of a batch of `n` tasks: a tensor of `n` rows keeps
    those rows, one of `2n` rows (classifier-free guidance: [uncond; cond]) keeps them in both
    halves; anything else is returned as is."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if value.shape[0] == n:
        return value[keep]
    if value.shape[0] == 2 * n:
        return value[keep + [n + k for k in keep]]
    return value


def generators(tasks: Sequence[ImageTask]) -> list[torch.Generator]:
    return [torch.Generator(device="cpu").manual_seed(t.seed) for t in tasks]


def weighted_sum(parts: Sequence[tuple[float, tuple[torch.Tensor, ...]]]) -> tuple[torch.Tensor, ...]:
    total = sum(w for w, _ in parts)
    n = len(parts[0][1])
    return tuple(sum(w * emb[i] for w, emb in parts) / total for i in range(n))  # type: ignore[misc]


@contextmanager
def circular_padding(modules: Sequence[torch.nn.Module], enabled: bool) -> Iterator[None]:
    """Seamless tiling: padded convs wrap around the image edges, restored on exit."""
    saved: list[tuple[torch.nn.Conv2d, Literal["zeros", "reflect", "replicate", "circular"]]] = []
    if enabled:
        for module in modules:
            for conv in module.modules():
                if isinstance(conv, torch.nn.Conv2d) and not isinstance(conv.padding, str) \
                        and any(p > 0 for p in conv.padding):  # str: "same"/"valid", pads nothing to wrap
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
def per_task_calls(module: torch.nn.Module, method: str, n_tasks: int | Callable[[], int]) -> Iterator[None]:
    """Run `module.<method>` once per task, on exactly the rows that task would have alone.

    CPU kernels pick different code paths by batch size (oneDNN conv algorithms, MKL's small-M
    GEMM, thread splits, channels-last GroupNorm at N=1), so the same row computed in a batch of
    1 and of 4 differs in the last bits, and after rounding to uint8 about one pixel value in a
    few hundred moves by 1. Feeding each task's rows (its own, or its [cond, uncond] pair under
    guidance) as their own call gives every task the shapes of a lone run: batch-invariant by
    construction. Everything between these calls (scheduler steps, guidance) is elementwise.
    `n_tasks` may be a callable: the live count of a batch that drops cancelled rows.
    """
    original = getattr(module, method)
    shadowed = module.__dict__.get(method)  # an instance attribute already there (unet_split's forward)
    count = n_tasks

    def per_task(*args: Any, **kwargs: Any) -> Any:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        n = first.shape[0] if first is not None and first.dim() > 0 else 0
        n_tasks = count() if callable(count) else count
        if n_tasks == 1 or n not in (n_tasks, 2 * n_tasks):
            return original(*args, **kwargs)
        groups = [[i] if n == n_tasks else [i, n_tasks + i] for i in range(n_tasks)]
        outs = [original(*_take(args, g, n), **_take(kwargs, g, n)) for g in groups]
        order = torch.argsort(torch.tensor([i for g in groups for i in g]))
        assert first is not None  # n matched n_tasks (>= 1 task) or twice it, so a batch tensor was passed
        return _merge(outs, order.to(first.device))

    setattr(module, method, per_task)  # instance attribute shadows the class's method
    try:
        yield
    finally:
        if shadowed is None:
            delattr(module, method)
        else:
            setattr(module, method, shadowed)
