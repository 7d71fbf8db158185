"""Spend limits that hold: what a subject (all its runs) and the whole organisation (a day)
may spend on model calls, checked before each request is sent.

- Per subject: `LLM_SUBJECT_TOKEN_BUDGET` tokens over every run of the subject, re-runs and
  forks included, so that re-running a visit again and again cannot spend without limit.
- Per day: `LLM_DAILY_BUDGET_USD` dollars over every call of the organisation since midnight
  (UTC); 0 turns it off. Once spent, new calls stop with a permanent error until the next day;
  an operator retries the failed stages then (or raises the budget).
- Per request: every request asks for at most `LLM_MAX_OUTPUT_TOKENS` tokens of answer.

The checks read the ledger, which holds what the provider billed: answers reused from the memo
cost nothing and count nothing. Two calls checked at the same instant may both pass; the limit
is overshot by at most the calls in flight, which `LLM_MAX_OUTPUT_TOKENS` bounds.
"""

from __future__ import annotations

from datetime import UTC, datetime, time

from django.conf import settings
from django.db.models import F, Sum
from django.utils import timezone
from pydantic import BaseModel, ConfigDict

from pipeline.core.errors import BudgetExceeded
from pipeline.core.models import LLMCall
from pipeline.core.selectors import usage_totals

# The dashboard warns from this share of the daily budget on.
NEARLY_SPENT = 0.9


class DailyBudget(BaseModel):
    """The organisation's spend today against its daily budget (`limit_usd` 0: no limit)."""

    model_config = ConfigDict(frozen=True)

    limit_usd: float
    spent_usd: float
    resets_at: datetime

    @property
    def limited(self) -> bool:
        return self.limit_usd > 0

    @property
    def left_usd(self) -> float:
        return max(0.0, self.limit_usd - self.spent_usd)

    @property
    def spent(self) -> bool:
        return self.limited and self.spent_usd >= self.limit_usd

    @property
    def nearly_spent(self) -> bool:
        return self.limited and not self.spent and self.spent_usd >= NEARLY_SPENT * self.limit_usd


def daily_budget(now: datetime | None = None) -> DailyBudget:
    """Today's spend (UTC day) against `LLM_DAILY_BUDGET_USD`: one query."""
    today = (now or timezone.now()).astimezone(UTC).date()
    midnight = datetime.combine(today, time.min, tzinfo=UTC)
    spent = usage_totals(since=midnight, ledger_only=True).cost_usd
    return DailyBudget(
        limit_usd=float(settings.LLM_DAILY_BUDGET_USD),
        spent_usd=float(spent),
        resets_at=datetime.combine(today, time.max, tzinfo=UTC),
    )


class SubjectSpend(BaseModel):
    """What one subject (a visit) has spent over all its runs, against its token budget."""

    model_config = ConfigDict(frozen=True)

    subject: str
    tokens: int
    limit: int

    @property
    def left(self) -> int:
        return max(0, self.limit - self.tokens)


def subjects_nearest_budget(count: int = 5) -> list[SubjectSpend]:
    """The subjects that have spent the most tokens, all their runs together: one query."""
    rows = (
        LLMCall.objects.order_by()
        .values(subject=F("stage__run__subject"))
        .annotate(tokens=Sum(F("input_tokens") + F("output_tokens")))
        .order_by("-tokens", "subject")[:count]
    )
    limit = int(settings.LLM_SUBJECT_TOKEN_BUDGET)
    return [SubjectSpend(subject=r["subject"], tokens=r["tokens"], limit=limit) for r in rows]


def spend_allowed(*, subject: str) -> None:
    """Raise `BudgetExceeded` if another request would go past the subject's or the day's
    budget; return quietly otherwise."""
    limit = int(settings.LLM_SUBJECT_TOKEN_BUDGET)
    used = usage_totals(subjects=[subject], ledger_only=True).total_tokens
    if used >= limit:
        raise BudgetExceeded(
            f"{subject} has used {used:,} LLM tokens over all its runs; its budget is "
            f"{limit:,} (LLM_SUBJECT_TOKEN_BUDGET). Raise the budget, or shorten the recording."
        )
    today = daily_budget()
    if today.spent:
        raise BudgetExceeded(
            f"The organisation's LLM budget for today (${today.limit_usd:,.2f}, "
            "LLM_DAILY_BUDGET_USD) is spent: no new model calls until midnight UTC. Retry the "
            "stage then, or raise the budget."
        )
