"""The replica's GPU memory budget: which batches are the worst case, and running them at start.

A fractional replica is held to its share of the card (`set_per_process_memory_fraction`), and the
batcher never forms a batch above `max_batch_megapixels`. What is left to prove is that the
largest batch the limits allow fits that share: `probe` runs it once (one step, so it costs
seconds) when the replica starts. A budget too large for the share then fails the deploy with a
message that says what to change, instead of a CUDA OOM on some request later, which would break
the replica's CUDA context (the health check restarts it and every request in it fails).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from deployments.diffusion.types import ImageTask

logger = logging.getLogger("genserve.diffusion")


@dataclass(frozen=True)
class ProbeShape:
    side: int
    batch: int

    @property
    def megapixels(self) -> float:
        return self.batch * self.side**2 / 1e6


def worst_case_shapes(*, native_side: int, max_side: int, size_multiple: int, max_batch_size: int,
                      max_batch_megapixels: float) -> list[ProbeShape]:
    """The batches that bound peak memory: as many native-size images as the budget allows, and as
    many of the largest allowed images (memory grows with pixels, and per image faster than
    linearly with side at the attention layers, so both ends are checked)."""
    largest = max_side - max_side % size_multiple  # the largest side the size rules accept
    while largest >= size_multiple and largest**2 / 1e6 > max_batch_megapixels:
        largest -= size_multiple  # the ingress refuses larger images (422)
    shapes = []
    for side in dict.fromkeys((native_side, largest)):  # unique, in order
        if side < size_multiple or side**2 / 1e6 > max_batch_megapixels:
            continue
        batch = min(max_batch_size, math.floor(max_batch_megapixels / (side**2 / 1e6) + 1e-9))
        shapes.append(ProbeShape(side, batch))
    return shapes


def probe(engine: Any, shapes: list[ProbeShape], *, share: float | None) -> dict:
    """Run each shape once (1 step) on CUDA; peak memory per shape, or RuntimeError when one does not fit."""
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    cap_gib = (share if share and share < 1 else 1.0) * total / 2**30
    report: dict[str, Any] = {"cap_gib": round(cap_gib, 2), "shapes": []}
    for shape in shapes:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        tasks = [ImageTask(prompt="memory probe", negative_prompt="", seed=i, width=shape.side, height=shape.side,
                           steps=1, guidance_scale=5.0) for i in range(shape.batch)]
        out = engine.generate_images(tasks)
        failed = next((r for r in out if isinstance(r, Exception)), None)
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
        if failed is not None:
            raise RuntimeError(
                f"a batch of {shape.batch} images of {shape.side}x{shape.side} ({shape.megapixels:.2f} MP, the "
                f"largest the limits allow) does not fit this replica's GPU share ({cap_gib:.1f} GiB): "
                f"{type(failed).__name__}: {failed}. Lower batching.max_batch_megapixels or max_side, or give "
                f"the replica a larger num_gpus.")
        report["shapes"].append({"side": shape.side, "batch": shape.batch, "megapixels": round(shape.megapixels, 3),
                                 "peak_gib": round(peak_gib, 2)})
        logger.info("memory probe: %d x %dpx peaked at %.1f of %.1f GiB", shape.batch, shape.side, peak_gib, cap_gib)
    torch.cuda.empty_cache()
    return report
