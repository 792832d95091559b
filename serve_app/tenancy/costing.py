"""GPU cost of recorded usage, and what it comes to per 1k tokens and per image.

GPU cost = measured GPU-seconds × the model's `tenancy.gpu_cost` rate (USD per GPU-hour) / 3600,
applied when a report is made (the ledger keeps the measurement, not the rate: a rate change
reprices past usage in later reports; statements print the rates they used).

A ledger row either produced images (image routes) or did not (chat, completions, a prompt
expansion): its GPU cost and its priced amount go to "per image" or to "per 1k tokens"
(prompt + completion tokens) accordingly, so neither figure mixes in the other's work.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, case, func, select

from serve_app.tenancy.config import GpuCostConfig
from serve_app.tenancy.models import UsageEvent


@dataclass(frozen=True)
class Part:
    """Ledger rows of one day and model, image rows or token rows (`made_images`), summed."""

    day: object
    model: str
    made_images: bool
    tokens: int
    images: int
    gpu_seconds: float
    cost_micros: int


def parts(conn: Connection, tenant_id: int, since: object, until: object) -> list[Part]:
    e = UsageEvent
    img = case((e.images > 0, 1), else_=0)
    rows = conn.execute(
        select(e.day, e.model, img, func.sum(e.prompt_tokens + e.completion_tokens), func.sum(e.images),
               func.sum(e.gpu_seconds), func.sum(e.cost_micros))
        .where(e.tenant_id == tenant_id, e.day >= since, e.day <= until)
        .group_by(e.day, e.model, img).order_by(e.day, e.model, img)).all()
    return [Part(r[0], r[1], bool(r[2]), int(r[3] or 0), int(r[4] or 0), float(r[5] or 0.0), int(r[6] or 0))
            for r in rows]


def gpu_cost_usd(gpu_cost: GpuCostConfig, model: str, gpu_seconds: float) -> float:
    return gpu_seconds * gpu_cost.rate(model) / 3600.0


def cost_fields(gpu_cost: GpuCostConfig, selected: Iterable[Part]) -> dict[str, float | None]:
    """The GPU cost of `selected` and the unit figures beside the priced amount (None: no tokens,
    or no images, to divide by)."""
    tok_cost, img_cost, tok_price, img_price = [], [], 0, 0
    tokens = images = 0
    for p in selected:
        c = gpu_cost_usd(gpu_cost, p.model, p.gpu_seconds)
        if p.made_images:
            img_cost.append(c)
            img_price += p.cost_micros
            images += p.images
        else:
            tok_cost.append(c)
            tok_price += p.cost_micros
            tokens += p.tokens
    return {
        "gpu_cost_usd": math.fsum(tok_cost + img_cost),
        "gpu_cost_per_1k_tokens_usd": math.fsum(tok_cost) * 1000 / tokens if tokens else None,
        "price_per_1k_tokens_usd": tok_price / 1e6 * 1000 / tokens if tokens else None,
        "gpu_cost_per_image_usd": math.fsum(img_cost) / images if images else None,
        "price_per_image_usd": img_price / 1e6 / images if images else None,
    }
