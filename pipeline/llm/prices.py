"""Model prices with effective dates, so that a call is priced at what it cost that day.

The rows come from two places: the file `LLM_PRICE_TABLE`, reviewed like code and shipped with
a release, and rows published in the admin (`ModelPrice`) when a provider changes its prices
between releases. For one model and date, a published row wins over the file, and a newer
published row over an older one: a correction never edits history, it supersedes it.
"""

from __future__ import annotations

import json
import logging
from datetime import date, datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from pydantic import BaseModel, TypeAdapter

from pipeline.core.errors import OperationRefused
from pipeline.llm.models import ModelPrice

logger = logging.getLogger(__name__)

_MILLION = Decimal(1_000_000)


class Price(BaseModel):
    model: str
    effective_from: date
    input_usd_per_million: Decimal
    output_usd_per_million: Decimal
    # When a row was published in the admin; None for the file's rows, which any published
    # row of the same model and date supersedes.
    published_at: datetime | None = None

    @property
    def source(self) -> str:
        return "published" if self.published_at else "price table file"


@lru_cache(maxsize=4)
def _load(path: Path) -> tuple[Price, ...]:
    return tuple(TypeAdapter(list[Price]).validate_python(json.loads(path.read_text())))


def _published() -> tuple[Price, ...]:
    try:
        rows = list(ModelPrice.objects.all())
    except DatabaseError:
        # Before `migrate` has made the table (system checks run first): the file alone.
        return ()
    return tuple(
        Price(
            model=row.model,
            effective_from=row.effective_from,
            input_usd_per_million=row.input_usd_per_million,
            output_usd_per_million=row.output_usd_per_million,
            published_at=row.created_at,
        )
        for row in rows
    )


def price_table() -> tuple[Price, ...]:
    """Every price row, the file's and the published ones."""
    return _load(Path(settings.LLM_PRICE_TABLE)) + _published()


def _precedence(price: Price) -> tuple[date, bool, datetime | None]:
    return (price.effective_from, price.published_at is not None, price.published_at)


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
    return max(in_force, key=_precedence, default=None)


def price_required(model: str, on: date) -> Price:
    """The price of `model` on `on`; refused if the table has none (a run must never be
    moved to a model whose calls would be recorded at $0)."""
    price = price_for(model, on)
    if price is None:
        known = ", ".join(sorted({p.model for p in price_table()}))
        raise OperationRefused(
            f"The price table ({settings.LLM_PRICE_TABLE}) has no price for “{model}” on {on}; "
            f"priced models: {known}. Publish its price in the admin (Model prices) first."
        )
    return price


def price_check(
    *, model: str, input_usd_per_million: Decimal, output_usd_per_million: Decimal, reason: str
) -> str:
    """Refuse a price row that could not be kept; return the model's name, cleaned."""
    model = model.strip()
    if not model:
        raise OperationRefused("Name the model the price is for.")
    if input_usd_per_million < 0 or output_usd_per_million < 0:
        raise OperationRefused("A price cannot be negative.")
    if not reason.strip():
        raise OperationRefused("Say why: a reason is required for the price's history.")
    return model


def price_publish(
    *,
    model: str,
    effective_from: date,
    input_usd_per_million: Decimal,
    output_usd_per_million: Decimal,
    reason: str,
    user: Any,
) -> ModelPrice:
    """Put a price row in force from `effective_from`, saying who and why.

    Calls already made keep the cost recorded when they were made: the ledger stores each
    call's dollars, so a row only prices calls made after it is published."""
    model = price_check(
        model=model,
        input_usd_per_million=input_usd_per_million,
        output_usd_per_million=output_usd_per_million,
        reason=reason,
    )
    try:
        with transaction.atomic():
            row = ModelPrice.objects.create(
                model=model,
                effective_from=effective_from,
                input_usd_per_million=input_usd_per_million,
                output_usd_per_million=output_usd_per_million,
                created_by=user,
                created_by_label=user.get_username() if user else "cli",
                reason=reason.strip()[:300],
            )
    except IntegrityError as exc:  # the constraints above, should a caller skip this function
        raise OperationRefused(f"The price row was refused: {exc}") from None
    logger.info("price of %s from %s published by %s", model, effective_from, row.created_by_label)
    return row


def cost_usd(model: str, on: date, *, input_tokens: int, output_tokens: int) -> Decimal:
    price = price_for(model, on)
    if price is None:
        logger.warning("no price for model %s on %s; its calls are recorded at $0", model, on)
        return Decimal(0)
    cost = (
        input_tokens * price.input_usd_per_million + output_tokens * price.output_usd_per_million
    ) / _MILLION
    return cost.quantize(Decimal("0.000001"))
