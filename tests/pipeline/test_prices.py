"""Prices with effective dates: the reviewed file, and rows published in the admin over it."""

from __future__ import annotations

import json
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from pipeline.core.errors import OperationRefused
from pipeline.llm import prices
from pipeline.llm.models import ModelPrice

pytestmark = pytest.mark.django_db


def publish(model: str, day: date, inp: str, out: str, reason: str = "provider notice"):
    return prices.price_publish(
        model=model,
        effective_from=day,
        input_usd_per_million=Decimal(inp),
        output_usd_per_million=Decimal(out),
        reason=reason,
        user=None,
    )


def test_gpt_4o_mini_is_priced_as_itself_not_as_gpt_4o():
    price = prices.price_for("gpt-4o-mini", date(2025, 1, 15))

    assert price is not None
    assert price.model == "gpt-4o-mini"
    assert price.input_usd_per_million == Decimal("0.15")
    assert price.output_usd_per_million == Decimal("0.60")
    assert prices.cost_usd(
        "gpt-4o-mini", date(2025, 1, 15), input_tokens=1_000, output_tokens=500
    ) == Decimal("0.000450")


def test_dated_snapshots_take_their_familys_price():
    mini = prices.price_for("gpt-4o-mini-2024-07-18", date(2025, 1, 15))
    full = prices.price_for("gpt-4o-2024-08-06", date(2025, 1, 15))

    assert mini is not None and mini.model == "gpt-4o-mini"
    assert full is not None and full.model == "gpt-4o"
    assert full.input_usd_per_million == Decimal("2.50")


def test_gpt_4_1_mini_is_not_priced_as_gpt_4_1():
    price = prices.price_for("gpt-4.1-mini", date(2025, 6, 1))

    assert price is not None
    assert price.model == "gpt-4.1-mini"
    assert price.input_usd_per_million == Decimal("0.40")


def test_a_model_that_only_shares_a_prefix_is_unknown():
    assert prices.price_for("gpt-4omni", date(2025, 1, 15)) is None


def test_a_model_is_not_priced_as_its_parent_family_before_its_own_price_exists():
    """gpt-4o-mini has a price from 2024-07-18. Before that the table knows no price for it;
    borrowing gpt-4o's (33x higher) would be the very mix-up price_for promises never to make."""
    assert prices.price_for("gpt-4o-mini", date(2024, 7, 1)) is None


@pytest.mark.parametrize(
    ("day", "input_per_million", "output_per_million"),
    [
        (date(2024, 5, 13), "5.00", "15.00"),
        (date(2024, 9, 30), "5.00", "15.00"),
        (date(2024, 10, 1), "2.50", "10.00"),
        (date(2025, 3, 1), "2.50", "10.00"),
    ],
)
def test_gpt_4o_price_follows_its_effective_dates(day, input_per_million, output_per_million):
    price = prices.price_for("gpt-4o", day)

    assert price is not None
    assert price.model == "gpt-4o"
    assert price.input_usd_per_million == Decimal(input_per_million)
    assert price.output_usd_per_million == Decimal(output_per_million)


def test_gpt_4o_cost_before_and_after_the_price_cut():
    tokens = {"input_tokens": 1_000_000, "output_tokens": 1_000_000}

    assert prices.cost_usd("gpt-4o", date(2024, 9, 30), **tokens) == Decimal("20.000000")
    assert prices.cost_usd("gpt-4o", date(2024, 10, 1), **tokens) == Decimal("12.500000")
    assert prices.cost_usd("gpt-4o", date(2024, 10, 1), input_tokens=1234, output_tokens=56) == (
        Decimal("0.003645")  # (1234 * 2.50 + 56 * 10.00) / 1e6 = 0.003645
    )


def test_nothing_is_priced_before_the_table_begins():
    assert prices.price_for("gpt-4o", date(2024, 5, 12)) is None


def test_unknown_model_costs_nothing_and_is_logged(caplog):
    assert prices.price_for("llama-3-70b", date(2025, 1, 15)) is None

    with caplog.at_level("WARNING", logger="pipeline.llm.prices"):
        cost = prices.cost_usd(
            "llama-3-70b", date(2025, 1, 15), input_tokens=10_000, output_tokens=10_000
        )

    assert cost == Decimal(0)
    assert "no price for model llama-3-70b on 2025-01-15" in caplog.text


def test_offline_engine_is_free():
    assert prices.cost_usd(
        "offline-engine", date(2025, 1, 15), input_tokens=0, output_tokens=0
    ) == Decimal("0.000000")


def test_price_table_comes_from_settings(settings, tmp_path: Path):
    table = tmp_path / "prices.json"
    table.write_text(
        json.dumps(
            [
                {
                    "model": "house-model",
                    "effective_from": "2025-01-01",
                    "input_usd_per_million": "1",
                    "output_usd_per_million": "3",
                }
            ]
        )
    )
    settings.LLM_PRICE_TABLE = table

    assert prices.price_for("gpt-4o", date(2025, 6, 1)) is None
    assert prices.cost_usd(
        "house-model", date(2025, 6, 1), input_tokens=2_000_000, output_tokens=1_000_000
    ) == Decimal("5.000000")


# --- rows published in the admin ------------------------------------------------------------


def test_a_published_row_prices_calls_from_its_date_and_the_file_before_it():
    publish("gpt-4o-mini", date(2025, 3, 1), "0.10", "0.40")

    before = prices.price_for("gpt-4o-mini", date(2025, 2, 28))
    after = prices.price_for("gpt-4o-mini", date(2025, 3, 1))

    assert (before.input_usd_per_million, before.source) == (Decimal("0.15"), "price table file")
    assert (after.input_usd_per_million, after.source) == (Decimal("0.10"), "published")
    assert prices.cost_usd(
        "gpt-4o-mini", date(2025, 3, 2), input_tokens=1_000_000, output_tokens=1_000_000
    ) == Decimal("0.500000")
    # Dated snapshots follow their family's published row too.
    assert prices.price_for("gpt-4o-mini-2024-07-18", date(2025, 3, 1)) == after


def test_a_correction_for_the_same_date_supersedes_the_file_and_the_earlier_row():
    # The file's own row for gpt-4o from 2024-10-01, then two published corrections of it.
    publish("gpt-4o", date(2024, 10, 1), "2.40", "9.60", reason="contract rate")
    publish("gpt-4o", date(2024, 10, 1), "2.45", "9.80", reason="contract rate, corrected")

    price = prices.price_for("gpt-4o", date(2025, 1, 1))

    assert (price.input_usd_per_million, price.output_usd_per_million) == (
        Decimal("2.45"),
        Decimal("9.80"),
    )
    # Nothing was edited: all three rows are still there to explain earlier figures.
    assert ModelPrice.objects.filter(model="gpt-4o").count() == 2
    assert len([p for p in prices.price_table() if p.model == "gpt-4o"]) == 4


def test_a_model_priced_only_by_a_published_row_is_priced():
    assert prices.price_for("house-model", date(2025, 6, 1)) is None

    publish("house-model", date(2025, 1, 1), "1", "3")

    assert prices.price_required("house-model", date(2025, 6, 1)).source == "published"


@pytest.mark.parametrize(
    ("model", "inp", "out", "reason", "message"),
    [
        ("  ", "1", "1", "x", "Name the model"),
        ("gpt-4o", "-1", "1", "x", "cannot be negative"),
        ("gpt-4o", "1", "-0.01", "x", "cannot be negative"),
        ("gpt-4o", "1", "1", "   ", "Say why"),
    ],
)
def test_a_row_that_could_not_be_kept_is_refused(model, inp, out, reason, message):
    with pytest.raises(OperationRefused, match=message):
        publish(model, date(2025, 1, 1), inp, out, reason=reason)

    assert not ModelPrice.objects.exists()
