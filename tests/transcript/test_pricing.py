"""Cost arithmetic: known token counts give a known cost."""

from __future__ import annotations

import pytest

from bot.domain.pricing import ModelPrice, cost_usd, fmt_cost, price_for, price_table
from engines.base import TokenUsage


def test_known_tokens_give_a_known_cost() -> None:
    price = ModelPrice(input=1.25, cached_input=0.125, output=10.0)
    # 1,000,000 input of which 400,000 cached, 200,000 output:
    # 600k × 1.25 + 400k × 0.125 + 200k × 10 = 0.75 + 0.05 + 2.00 dollars
    usage = TokenUsage(input_tokens=1_000_000, cached_input_tokens=400_000, output_tokens=200_000)
    assert cost_usd(usage, price) == pytest.approx(2.80)
    assert cost_usd(TokenUsage(input_tokens=100, output_tokens=50), price) == pytest.approx(
        0.000625
    )
    assert cost_usd(usage, None) == 0.0


def test_price_table_defaults_overrides_and_prefixes() -> None:
    table = price_table({"gpt-5.5": {"output": 20}, "my-local": {"input": 0.5}})
    assert table["gpt-5.5"] == ModelPrice(1.25, 0.125, 20.0)
    assert table["my-local"] == ModelPrice(0.5, 0.5, 0.0)
    assert price_for("gpt-5-mini-2025-08-07", table) == table["gpt-5-mini"]
    assert price_for("unknown", table) is None and price_for(None, table) is None


def test_fmt_cost() -> None:
    assert fmt_cost(0.000625) == "$0.0006"
    assert fmt_cost(12.3456) == "$12.35"
    assert fmt_cost(None) == "—"
