"""Cost of usage in integer micro-USD (exact sums and exact budget comparisons in SQL)."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from serve_app.tenancy.config import PricesConfig

MICROS = Decimal(1_000_000)


def cost_micros(prices: PricesConfig, *, prompt_tokens: int = 0, completion_tokens: int = 0,
                images: int = 0, gpu_seconds: float = 0.0) -> int:
    usd = (
        Decimal(prompt_tokens) * Decimal(str(prices.per_1k_prompt_tokens)) / 1000
        + Decimal(completion_tokens) * Decimal(str(prices.per_1k_completion_tokens)) / 1000
        + Decimal(images) * Decimal(str(prices.per_image))
        + Decimal(str(gpu_seconds)) * Decimal(str(prices.per_gpu_second))
    )
    return int((usd * MICROS).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def estimate_micros(prices: PricesConfig, *, tokens: int = 0, images: int = 0, gpu_seconds: float = 0.0) -> int:
    """Upper-bound hold before the split of prompt/completion tokens is known."""
    per_1k = max(prices.per_1k_prompt_tokens, prices.per_1k_completion_tokens)
    usd = (Decimal(tokens) * Decimal(str(per_1k)) / 1000 + Decimal(images) * Decimal(str(prices.per_image))
           + Decimal(str(gpu_seconds)) * Decimal(str(prices.per_gpu_second)))
    return int((usd * MICROS).to_integral_value(rounding="ROUND_CEILING"))


def usd(micros: int) -> float:
    return micros / 1_000_000
