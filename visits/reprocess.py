"""Batch reprocessing: choose visits, plan what will run and what is reused, then do it.

Used by `manage.py reprocess`; the plan is what `--dry-run` prints."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.db.models import QuerySet

from pipeline import (
    OperationRefused,
    RunStatus,
    filter_failed_at,
    run_rerun_plan,
    run_retry_plan,
    stage_token_averages,
    usage_totals,
)
from visits.models import Visit
from visits.services import rerun_model_check, visit_rerun_from, visit_retry
from visits.stages import VISIT_WORKFLOW


@dataclass(frozen=True)
class VisitPlan:
    visit: Visit
    mode: str  # "retry" or "rerun"
    runs: list[str]  # stages that will run
    reused: list[str]  # stages whose outputs are reused
    estimated_tokens: int
    skip_reason: str = ""


@dataclass
class ReprocessOutcome:
    succeeded: int = 0
    failed: int = 0
    enqueued: int = 0
    refused: list[str] = field(default_factory=list)
    tokens_spent: int = 0
    tokens_saved: int = 0
    cost_usd: Decimal = Decimal(0)
    saved_cost_usd: Decimal = Decimal(0)


def visits_for_reprocess(
    *,
    visit_ids: list[int] | None = None,
    status: str | None = None,
    failed_stage: str | None = None,
    since: datetime | None = None,
) -> QuerySet[Visit]:
    visits = Visit.objects.select_related("current_run").order_by("id")
    if visit_ids:
        visits = visits.filter(id__in=visit_ids)
    if status:
        visits = visits.filter(current_run__status=status)
    if failed_stage:
        visits = filter_failed_at(visits, via="current_run", stage_name=failed_stage)
    if since:
        visits = visits.filter(created_at__gte=since)
    return visits.distinct()


def reprocess_plan(visits: QuerySet[Visit], *, from_stage: str | None) -> list[VisitPlan]:
    estimates = stage_token_averages(VISIT_WORKFLOW.name)
    plans = []
    for visit in visits:
        run = visit.current_run
        if run is None:
            continue
        mode = "rerun" if from_stage else "retry"
        try:
            if from_stage:
                reused, runs = run_rerun_plan(run, from_stage)
            else:
                reused, runs = run_retry_plan(run)
            skip = ""
        except OperationRefused as exc:
            reused, runs, skip = [], [], str(exc)
        plans.append(
            VisitPlan(
                visit=visit,
                mode=mode,
                runs=runs,
                reused=reused,
                estimated_tokens=sum(estimates.get(name, 0) for name in runs),
                skip_reason=skip,
            )
        )
    return plans


def reprocess_execute(
    plans: Iterable[VisitPlan],
    *,
    from_stage: str | None,
    reason: str,
    inline: bool,
    model: str | None = None,
    label: str = "",
) -> ReprocessOutcome:
    """Carry out a plan as a command-line operator (audited under the command's --actor and
    the OS login, see `visits.privacy.audit.command_origin`); `plans` may be wrapped
    in a progress bar. Re-runs may ask another `model` (refused before anything runs if it
    has no price) and carry a `label`."""
    if model and from_stage:
        rerun_model_check(stage=from_stage, model=model)
    outcome = ReprocessOutcome()
    started = datetime.now().astimezone()
    touched: list[Visit] = []
    for plan in plans:
        if plan.skip_reason:
            outcome.refused.append(f"visit {plan.visit.pk}: {plan.skip_reason}")
            continue
        try:
            if from_stage:
                visit_rerun_from(
                    visit=plan.visit,
                    stage=from_stage,
                    actor=None,
                    reason=reason,
                    inline=inline,
                    model=model,
                    label=label,
                )
            else:
                visit_retry(visit=plan.visit, actor=None, reason=reason, inline=inline)
        except OperationRefused as exc:
            outcome.refused.append(f"visit {plan.visit.pk}: {exc}")
            continue
        touched.append(plan.visit)
        plan.visit.refresh_from_db()
        run = plan.visit.current_run
        assert run is not None  # retrying or re-running needs the current run, and keeps one
        status = run.status
        if status == RunStatus.SUCCEEDED:
            outcome.succeeded += 1
        elif status in (RunStatus.FAILED, RunStatus.CANCELLED):
            outcome.failed += 1
        else:
            outcome.enqueued += 1
    usage = usage_totals(subjects=[visit.subject for visit in touched], since=started)
    outcome.tokens_spent = usage.total_tokens
    outcome.cost_usd = usage.cost_usd
    outcome.tokens_saved = usage.saved_tokens
    outcome.saved_cost_usd = usage.saved_cost_usd
    return outcome
