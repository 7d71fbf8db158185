"""Model prices with effective dates, so that a call is priced at what it cost that day."""

from __future__ import annotations

import json
import logging
from datetime import date
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from django.conf import settings
from pydantic import BaseModel, TypeAdapter

from pipeline.errors import OperationRefused

logger = logging.getLogger(__name__)

_MILLION = Decimal(1_000_000)


class Price(BaseModel):
    model: str
    effective_from: date
    input_usd_per_million: Decimal
    output_usd_per_million: Decimal


@lru_cache(maxsize=4)
def _load(path: Path) -> tuple[Price, ...]:
    prices = TypeAdapter(list[Price]).validate_python(json.loads(path.read_text()))
    return tuple(sorted(prices, key=lambda price: price.effective_from, reverse=True))


def price_table() -> tuple[Price, ...]:
    return _load(Path(settings.LLM_PRICE_TABLE))


def price_for(model: str, on: date) -> Price | None:
    """The price in force for `model` on `on`.

    A dated snapshot ("gpt-4o-2024-08-06") takes its family's price; the most specific family
    wins, so "gpt-4o-mini" is never priced as "gpt-4o"."""
    family = [
        price
        for price in price_table()
        if model == price.model or model.startswith(price.model + "-")
    ]
    if not family:
        return None
    # Choose the family by name first: before "gpt-4o-mini" had a price, it had none, not
    # the price of "gpt-4o".
    longest = max(len(price.model) for price in family)
    in_force = [p for p in family if len(p.model) == longest and p.effective_from <= on]
    return max(in_force, key=lambda price: price.effective_from, default=None)


def price_required(model: str, on: date) -> Price:
    """The price of `model` on `on`; refused if the table has none (a run must never be
    moved to a model whose calls would be recorded at $0)."""
    price = price_for(model, on)
    if price is None:
        known = ", ".join(sorted({p.model for p in price_table()}))
        raise OperationRefused(
            f"The price table ({settings.LLM_PRICE_TABLE}) has no price for “{model}” on {on}; "
            f"priced models: {known}. Add its row first."
        )
    return price


def cost_usd(model: str, on: date, *, input_tokens: int, output_tokens: int) -> Decimal:
    price = price_for(model, on)
    if price is None:
        logger.warning("no price for model %s on %s; its calls are recorded at $0", model, on)
        return Decimal(0)
    cost = (
        input_tokens * price.input_usd_per_million + output_tokens * price.output_usd_per_million
    ) / _MILLION
    return cost.quantize(Decimal("0.000001"))
