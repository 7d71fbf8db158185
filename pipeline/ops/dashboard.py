"""Reads for the operations dashboard: where the tokens, dollars and seconds went.

Every figure is an aggregate over the engine's own tables, restricted to a window of whole days:
- tokens and dollars come from the per-call ledger (`LLMCall`, by `created_at`), so the
  dashboard's totals are the ledger's totals, calls on failed attempts and forked runs included;
- attempt figures (outcomes, retries, durations, audio, "saved by resume") come from `Attempt`,
  by `started_at`; stages that gave up, by the stage's `finished_at`;
- re-runs are runs with `forked_from`, by `created_at`; operator actions are `AuditEntry` rows.

Figures are pydantic models, so that a page, a test or an export reads one typed shape. Each
selector is one query (grouped in the database); `dashboard_get` runs a fixed handful of
them whatever the number of rows. Stages are keyed by (workflow, stage name): the engine knows
nothing of the domain, so two workflows may well both have a stage called "summarize".
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from django.db import connection
from django.db.models import (
    Aggregate,
    Count,
    DurationField,
    ExpressionWrapper,
    F,
    FloatField,
    Min,
    Q,
    QuerySet,
    Sum,
)
from django.db.models.functions import TruncDate
from django.utils import timezone
from pydantic import BaseModel, ConfigDict

from pipeline.core.models import Attempt, AuditEntry, LLMCall, OperatorAction, Run, Stage
from pipeline.core.selectors import AttemptTotals, LedgerTotals, attempt_sums, ledger_sums
from pipeline.core.states import AttemptStatus, FailureKind, StageStatus
from pipeline.llm.budgets import (
    DailyBudget,
    SubjectSpend,
    daily_budget,
    subjects_nearest_budget,
)

DEFAULT_WINDOW_DAYS = 30
MAX_WINDOW_DAYS = 366

StageKey = tuple[str, str]  # (workflow, stage name)

_ZERO_USD = Decimal("0")


# --- result shapes ---------------------------------------------------------------------------


class _Figures(BaseModel):
    model_config = ConfigDict(frozen=True)


FiguresT = TypeVar("FiguresT", bound=BaseModel)


class Spend(LedgerTotals):
    """Tokens and dollars of a group of ledger rows (a stage, a model, a day, or all)."""

    label: str


class StageActivity(AttemptTotals):
    """What the attempts of one stage did in the window."""

    label: str
    attempts: int = 0
    succeeded: int = 0
    failed: int = 0
    lost: int = 0
    retries: int = 0  # attempts numbered 2 or more
    recovered: int = 0  # of those, the ones that succeeded
    p50_seconds: float | None = None  # of succeeded attempts
    p95_seconds: float | None = None


class FailureRow(_Figures):
    """Failures of one stage with one error code: failed and lost attempts, stages given up."""

    stage: str
    error_code: str
    failed_attempts: int = 0
    lost_attempts: int = 0
    stages_failed_permanently: int = 0
    stages_gave_up: int = 0  # their policy ran out of attempts

    @property
    def stages_failed(self) -> int:
        return self.stages_failed_permanently + self.stages_gave_up


class Tally(_Figures):
    label: str
    count: int


class Dashboard(_Figures):
    days: int
    since: datetime
    until: datetime
    spend_total: Spend
    spend_by_stage: list[Spend]
    spend_by_model: list[Spend]
    spend_by_day: list[Spend]  # one row per day of the window, oldest first, empty days too
    stages: list[StageActivity]
    stages_total: StageActivity
    failures: list[FailureRow]
    failures_total: FailureRow
    reruns_by_stage: list[Tally]
    reruns_total: int
    operator_actions: list[Tally]
    operator_actions_total: int
    # Items of stage outputs a person must review, by stage (outputs made in the window).
    flagged_by_stage: list[Tally]
    flagged_total: int
    budget_today: DailyBudget
    subjects_nearest_budget: list[SubjectSpend]

    @property
    def audio_hours(self) -> float:
        return self.stages_total.audio_seconds / 3600

    @property
    def saved_audio_hours(self) -> float:
        return self.stages_total.saved_audio_seconds / 3600


# --- the window ------------------------------------------------------------------------------


def window_start(*, days: int, now: datetime | None = None) -> datetime:
    """Midnight (in the current time zone) that opens a window of `days` whole days ending
    today: days=1 is today, days=30 is today and the 29 days before it."""
    if not 1 <= days <= MAX_WINDOW_DAYS:
        raise ValueError(f"days must be between 1 and {MAX_WINDOW_DAYS}, not {days}")
    today = timezone.localdate(now or timezone.now())
    first = today - timedelta(days=days - 1)
    return timezone.make_aware(datetime.combine(first, datetime.min.time()))


# --- stage labels ----------------------------------------------------------------------------


class _StageLabels:
    """Orders stages by workflow then position, and names them by stage name alone unless
    more than one workflow appears (then "workflow · name")."""

    def __init__(self) -> None:
        self._position: dict[StageKey, int] = {}

    def see(self, key: StageKey, position: int | None) -> None:
        known = self._position.get(key)
        if position is not None and (known is None or position < known):
            self._position[key] = position
        elif known is None:
            self._position[key] = 0

    def ordered(self, keys: set[StageKey] | list[StageKey]) -> list[StageKey]:
        return sorted(keys, key=lambda key: (key[0], self._position.get(key, 0), key[1]))

    def label(self, key: StageKey) -> str:
        workflows = {workflow for workflow, _ in self._position}
        return key[1] if len(workflows) <= 1 else f"{key[0]} · {key[1]}"


# --- the ledger: tokens and dollars ----------------------------------------------------------


def _spend(label: str, row: dict[str, Any]) -> Spend:
    return Spend(
        label=label,
        calls=int(row["calls"]),
        input_tokens=int(row["input_tokens"]),
        output_tokens=int(row["output_tokens"]),
        cost_usd=Decimal(row["cost_usd"]),
    )


def _calls(since: datetime) -> QuerySet[LLMCall]:
    return LLMCall.objects.filter(created_at__gte=since).order_by()


def llm_spend_by_stage(*, since: datetime) -> dict[StageKey, tuple[int, Spend]]:
    """Ledger totals per (workflow, stage name), with the stage's position for ordering."""
    rows = (
        _calls(since)
        .values(workflow=F("stage__run__workflow"), name=F("stage__name"))
        .annotate(position=Min("stage__position"), **ledger_sums())
    )
    return {(r["workflow"], r["name"]): (r["position"], _spend(r["name"], r)) for r in rows}


def llm_spend_by_model(*, since: datetime) -> list[Spend]:
    rows = _calls(since).values("model").annotate(**ledger_sums()).order_by("-cost_usd", "model")
    return [_spend(r["model"], r) for r in rows]


def llm_spend_by_day(*, since: datetime, until: datetime) -> list[Spend]:
    """One row per calendar day (current time zone) from `since` to `until`, zeros included."""
    tz = timezone.get_current_timezone()
    rows = (
        _calls(since)
        .annotate(day=TruncDate("created_at", tzinfo=tz))
        .values("day")
        .annotate(**ledger_sums())
    )
    found: dict[date, dict[str, Any]] = {_as_date(r["day"]): r for r in rows}
    first, last = timezone.localdate(since), timezone.localdate(until)
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    days += sorted(day for day in found if day > last)  # clock skew: never drop a paid call
    return [
        _spend(day.isoformat(), found[day]) if day in found else Spend(label=day.isoformat())
        for day in days
    ]


def _as_date(value: date | datetime | str) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value))


def _summed(model: type[FiguresT], rows: Sequence[FiguresT], **fixed: Any) -> FiguresT:
    """A total row: every numeric field (those that default to zero) added up over `rows`;
    `fixed` gives the rest (a label, say)."""
    totals = {
        name: sum((getattr(row, name) for row in rows), field.default)
        for name, field in model.model_fields.items()
        if name not in fixed and type(field.default) in (int, float, Decimal)
    }
    return model(**totals, **fixed)


# --- attempts: outcomes, retries, audio, saved by resume, durations --------------------------


def _attempts(since: datetime) -> QuerySet[Attempt]:
    return Attempt.objects.filter(started_at__gte=since).order_by()


def _count(condition: Q) -> Count:
    return Count("id", filter=condition)


def attempt_activity_by_stage(*, since: datetime) -> dict[StageKey, dict[str, Any]]:
    """Per (workflow, stage name): attempt outcomes, retries, audio and "saved by resume"."""
    rows = (
        _attempts(since)
        .values(workflow=F("stage__run__workflow"), name=F("stage__name"))
        .annotate(
            position=Min("stage__position"),
            attempts=Count("id"),
            succeeded=_count(Q(status=AttemptStatus.SUCCEEDED)),
            failed=_count(Q(status=AttemptStatus.FAILED)),
            lost=_count(Q(status=AttemptStatus.LOST)),
            retries=_count(Q(number__gte=2)),
            recovered=_count(Q(number__gte=2, status=AttemptStatus.SUCCEEDED)),
            **attempt_sums(),
        )
    )
    return {(r.pop("workflow"), r.pop("name")): r for r in rows}


def percentile(values: list[float], fraction: float) -> float | None:
    """The `fraction` percentile (a whole hundredth) with linear interpolation between the
    closest ranks: `statistics.quantiles`' inclusive method is PostgreSQL's percentile_cont, so
    both databases show one number."""
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[round(fraction * 100) - 1]


class _PercentileCont(Aggregate):
    """PostgreSQL's ordered-set aggregate over an interval, in seconds."""

    function = "PERCENTILE_CONT"
    template = (
        "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM %(expressions)s))"
    )
    output_field = FloatField()

    def __init__(self, expression: Any, *, fraction: float) -> None:
        super().__init__(expression, fraction=float(fraction))


_DURATION = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())


def attempt_duration_percentiles(
    *, since: datetime
) -> dict[StageKey, tuple[float | None, float | None]]:
    """p50 and p95 of succeeded attempts' durations (finished_at - started_at), in seconds,
    per (workflow, stage name). Computed by the database on PostgreSQL, in Python elsewhere."""
    succeeded = _attempts(since).filter(status=AttemptStatus.SUCCEEDED, finished_at__isnull=False)
    if connection.vendor == "postgresql":
        rows = succeeded.values(workflow=F("stage__run__workflow"), name=F("stage__name")).annotate(
            p50=_PercentileCont(_DURATION, fraction=0.5),
            p95=_PercentileCont(_DURATION, fraction=0.95),
        )
        return {(r["workflow"], r["name"]): (r["p50"], r["p95"]) for r in rows}
    durations: dict[StageKey, list[float]] = defaultdict(list)
    for workflow, name, started_at, finished_at in succeeded.values_list(
        "stage__run__workflow", "stage__name", "started_at", "finished_at"
    ):
        assert finished_at is not None  # the filter above is finished_at__isnull=False
        durations[(workflow, name)].append((finished_at - started_at).total_seconds())
    result = {}
    for key, values in durations.items():
        result[key] = (percentile(values, 0.5), percentile(values, 0.95))
    return result


# --- failures --------------------------------------------------------------------------------


def failures_by_stage_and_code(*, since: datetime) -> dict[tuple[StageKey, str], dict[str, int]]:
    """Failed and lost attempts per (stage, error code), and stages that gave up (status
    failed: a permanent error, or attempts exhausted) per (stage, the stage's error code)."""
    found: dict[tuple[StageKey, str], dict[str, int]] = defaultdict(
        lambda: {"failed": 0, "lost": 0, "permanent": 0, "gave_up": 0, "position": 0}
    )
    attempts = (
        _attempts(since)
        .filter(status__in=[AttemptStatus.FAILED, AttemptStatus.LOST])
        .values("error_code", workflow=F("stage__run__workflow"), name=F("stage__name"))
        .annotate(
            position=Min("stage__position"),
            failed=_count(Q(status=AttemptStatus.FAILED)),
            lost=_count(Q(status=AttemptStatus.LOST)),
        )
    )
    for r in attempts:
        row = found[((r["workflow"], r["name"]), r["error_code"])]
        row.update(failed=r["failed"], lost=r["lost"], position=r["position"])
    stages = (
        Stage.objects.filter(status=StageStatus.FAILED, finished_at__gte=since)
        .order_by()
        .values("error_code", "name", workflow=F("run__workflow"))
        .annotate(
            first_position=Min("position"),
            permanent=_count(Q(failure_kind=FailureKind.PERMANENT)),
            gave_up=_count(Q(failure_kind=FailureKind.EXHAUSTED)),
        )
    )
    for r in stages:
        row = found[((r["workflow"], r["name"]), r["error_code"])]
        row.update(permanent=r["permanent"], gave_up=r["gave_up"], position=r["first_position"])
    return dict(found)


# --- re-runs and operator actions ------------------------------------------------------------


def reruns_by_fork_stage(*, since: datetime) -> list[Tally]:
    """Runs forked from an earlier run ("re-run from stage X"), by the stage they re-ran from."""
    rows = (
        Run.objects.filter(forked_from__isnull=False, created_at__gte=since)
        .order_by()
        .values("fork_stage")
        .annotate(count=Count("id"))
        .order_by("-count", "fork_stage")
    )
    return [Tally(label=r["fork_stage"] or "—", count=r["count"]) for r in rows]


def operator_actions_by_action(*, since: datetime) -> list[Tally]:
    """Audit-trail entries per action, every action listed (zeros included)."""
    counts = dict(
        AuditEntry.objects.filter(created_at__gte=since)
        .order_by()
        .values("action")
        .annotate(count=Count("id"))
        .values_list("action", "count")
    )
    return [
        Tally(label=label, count=counts.get(value, 0)) for value, label in OperatorAction.choices
    ]


def flagged_by_stage(*, since: datetime) -> list[Tally]:
    """Items a person must review (`StageSpec.flagged`), by stage, over the outputs committed
    in the window (a re-run's reused outputs are not counted again)."""
    rows = (
        Stage.objects.filter(finished_at__gte=since, flagged__gt=0, status=StageStatus.SUCCEEDED)
        .filter(reused_from__isnull=True)
        .order_by()
        .values("run__workflow", "name", "position")
        .annotate(count=Sum("flagged"))
        .order_by("run__workflow", "position")
    )
    return [Tally(label=f"{r['run__workflow']}: {r['name']}", count=r["count"]) for r in rows]


# --- the whole page --------------------------------------------------------------------------


def dashboard_get(*, days: int = DEFAULT_WINDOW_DAYS, now: datetime | None = None) -> Dashboard:
    """Everything the dashboard shows for the last `days` whole days, in twelve queries
    (ten for the window, two for the budgets, which are not bounded by it)."""
    until = now or timezone.now()
    since = window_start(days=days, now=until)
    labels = _StageLabels()

    spend_by_stage = llm_spend_by_stage(since=since)
    activity = attempt_activity_by_stage(since=since)
    durations = attempt_duration_percentiles(since=since)
    failures = failures_by_stage_and_code(since=since)
    for key, (position, _) in spend_by_stage.items():
        labels.see(key, position)
    for key, row in activity.items():
        labels.see(key, row["position"])
    for (key, _), row in failures.items():
        labels.see(key, row["position"])

    stage_spend = [
        spend_by_stage[key][1].model_copy(update={"label": labels.label(key)})
        for key in labels.ordered(list(spend_by_stage))
    ]
    spend_by_model = llm_spend_by_model(since=since)
    spend_by_day = llm_spend_by_day(since=since, until=until)

    stages = []
    for key in labels.ordered(set(activity) | set(durations)):
        row = {k: v for k, v in activity.get(key, {}).items() if k != "position"}
        p50, p95 = durations.get(key, (None, None))
        stages.append(
            StageActivity(
                label=labels.label(key),
                p50_seconds=p50,
                p95_seconds=p95,
                **row,
            )
        )

    order = {key: i for i, key in enumerate(labels.ordered({key for key, _ in failures}))}
    failure_rows = [
        FailureRow(
            stage=labels.label(key),
            error_code=code or "(none)",
            failed_attempts=row["failed"],
            lost_attempts=row["lost"],
            stages_failed_permanently=row["permanent"],
            stages_gave_up=row["gave_up"],
        )
        for (key, code), row in sorted(failures.items(), key=lambda i: (order[i[0][0]], i[0][1]))
    ]

    reruns = reruns_by_fork_stage(since=since)
    actions = operator_actions_by_action(since=since)
    flagged = flagged_by_stage(since=since)
    return Dashboard(
        days=days,
        since=since,
        until=until,
        spend_total=_summed(Spend, stage_spend, label="Total"),
        spend_by_stage=stage_spend,
        spend_by_model=spend_by_model,
        spend_by_day=spend_by_day,
        stages=stages,
        stages_total=_summed(StageActivity, stages, label="Total"),
        failures=failure_rows,
        failures_total=_summed(FailureRow, failure_rows, stage="Total", error_code=""),
        reruns_by_stage=reruns,
        reruns_total=sum(r.count for r in reruns),
        operator_actions=actions,
        operator_actions_total=sum(r.count for r in actions),
        flagged_by_stage=flagged,
        flagged_total=sum(r.count for r in flagged),
        budget_today=daily_budget(until),
        subjects_nearest_budget=subjects_nearest_budget(),
    )
