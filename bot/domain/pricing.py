"""Money spent on model tokens: a per-model price table and pure cost arithmetic."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from engines.base import TokenUsage

PER = 1_000_000  # prices are quoted per million tokens


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens. Cached input is billed instead of, not on top of, input."""

    input: float
    cached_input: float
    output: float


# Defaults for the models our prompts and settings fall back to, from the provider's public
# list prices when this was written (USD per million tokens). Prices change: override them with
# DEKSDENFLOW_MODEL_PRICES rather than trusting these.
DEFAULT_PRICES: Mapping[str, ModelPrice] = {
    "gpt-5.5": ModelPrice(1.25, 0.125, 10.00),
    "gpt-5": ModelPrice(1.25, 0.125, 10.00),
    "gpt-5-codex": ModelPrice(1.25, 0.125, 10.00),
    "gpt-5-mini": ModelPrice(0.25, 0.025, 2.00),
    "gpt-5-nano": ModelPrice(0.05, 0.005, 0.40),
    "codex-mini-latest": ModelPrice(1.50, 0.375, 6.00),
    "o4-mini": ModelPrice(1.10, 0.275, 4.40),
    "gpt-4.1": ModelPrice(2.00, 0.50, 8.00),
}


def price_table(
    overrides: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, ModelPrice]:
    """The defaults with `overrides` ({model: {input, cached_input, output}}) laid over them.

    A partial override keeps the default's other figures; a new model without `cached_input`
    is billed its input price for cached tokens (no discount assumed).
    """
    table = dict(DEFAULT_PRICES)
    for model, given in (overrides or {}).items():
        base = table.get(model)
        input_price = float(given.get("input", base.input if base else 0.0))
        table[model] = ModelPrice(
            input=input_price,
            cached_input=float(
                given.get("cached_input", base.cached_input if base else input_price)
            ),
            output=float(given.get("output", base.output if base else 0.0)),
        )
    return table


def price_for(model: str | None, table: Mapping[str, ModelPrice]) -> ModelPrice | None:
    """The model's price: exact name first, then the longest known prefix (dated snapshots)."""
    if not model:
        return None
    if model in table:
        return table[model]
    prefixes = [name for name in table if model.startswith(name + "-")]
    return table[max(prefixes, key=len)] if prefixes else None


def cost_usd(usage: TokenUsage, price: ModelPrice | None) -> float:
    """What `usage` costs at `price`, in USD (0 when the model has no price)."""
    if price is None:
        return 0.0
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    uncached = usage.input_tokens - cached
    total = (
        uncached * price.input + cached * price.cached_input + usage.output_tokens * price.output
    )
    return total / PER


def fmt_cost(amount: float | None) -> str:
    """$0.0123 below a dollar (small steps stay visible), $12.34 above, "—" when unknown."""
    if amount is None:
        return "—"
    if amount < 1:
        return f"${amount:.4f}"
    return f"${amount:,.2f}"


def turn_cost(
    model: str | None, usage: TokenUsage, overrides: Mapping[str, Mapping[str, float]] | None
) -> float:
    """One turn's cost with the configured table (DEKSDENFLOW_MODEL_PRICES over the defaults)."""
    return cost_usd(usage, price_for(model, price_table(overrides)))
