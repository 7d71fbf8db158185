"""Batch reprocessing: choose visits, plan what will run and what is reused, then do it.

Used by `manage.py reprocess`; the plan is what `--dry-run` prints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.db.models import Count, F, QuerySet, Sum
from django.db.models.functions import Coalesce

from pipeline.models import Attempt, LLMCall, RunStatus, StageStatus
from pipeline.operations import OperationRefused, rerun_plan
from visits.models import Visit
from visits.services import visit_rerun_from, visit_retry
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
        visits = visits.filter(
            current_run__stages__name=failed_stage,
            current_run__stages__status=StageStatus.FAILED,
        )
    if since:
        visits = visits.filter(created_at__gte=since)
    return visits.distinct()


def stage_token_estimates() -> dict[str, int]:
    """Average tokens a stage has cost per stage execution so far, from the ledger."""
    rows = (
        LLMCall.objects.values(name=F("stage__name"))
        .annotate(
            tokens=Coalesce(Sum(F("input_tokens") + F("output_tokens")), 0),
            stages=Count("stage", distinct=True),
        )
        .values_list("name", "tokens", "stages")
    )
    return {name: round(tokens / stages) for name, tokens, stages in rows if stages}


def reprocess_plan(visits: QuerySet[Visit], *, from_stage: str | None) -> list[VisitPlan]:
    estimates = stage_token_estimates()
    names = VISIT_WORKFLOW.stage_names
    plans = []
    for visit in visits:
        run = visit.current_run
        if run is None:
            continue
        if from_stage:
            try:
                reused, runs = rerun_plan(run, from_stage)
                skip = ""
            except OperationRefused as exc:
                reused, runs, skip = [], [], str(exc)
            mode = "rerun"
        else:
            mode = "retry"
            failed = run.stages.filter(status=StageStatus.FAILED).order_by("position").first()
            if failed is None:
                reused, runs, skip = [], [], f"nothing to retry: run {run.pk} is {run.status}"
            else:
                reused, runs, skip = names[: failed.position], names[failed.position :], ""
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
    plans: list[VisitPlan],
    *,
    from_stage: str | None,
    reason: str,
    inline: bool,
    progress: Callable[[int, VisitPlan], None] | None = None,
) -> ReprocessOutcome:
    """Carry out a plan as a shell operator (audited as `cli:<login>`)."""
    outcome = ReprocessOutcome()
    started = datetime.now().astimezone()
    touched: list[Visit] = []
    for index, plan in enumerate(plans, start=1):
        if progress:
            progress(index, plan)
        if plan.skip_reason:
            outcome.refused.append(f"visit {plan.visit.pk}: {plan.skip_reason}")
            continue
        try:
            if from_stage:
                visit_rerun_from(
                    visit=plan.visit, stage=from_stage, actor=None, reason=reason, inline=inline
                )
            else:
                visit_retry(visit=plan.visit, actor=None, reason=reason, inline=inline)
        except OperationRefused as exc:
            outcome.refused.append(f"visit {plan.visit.pk}: {exc}")
            continue
        touched.append(plan.visit)
        plan.visit.refresh_from_db()
        status = plan.visit.current_run.status
        if status == RunStatus.SUCCEEDED:
            outcome.succeeded += 1
        elif status in (RunStatus.FAILED, RunStatus.CANCELLED):
            outcome.failed += 1
        else:
            outcome.enqueued += 1
    subjects = [visit.subject for visit in touched]
    spent = LLMCall.objects.filter(stage__run__subject__in=subjects, created_at__gte=started)
    totals = spent.aggregate(
        tokens=Coalesce(Sum(F("input_tokens") + F("output_tokens")), 0),
        cost=Coalesce(Sum("cost_usd"), Decimal(0)),
    )
    saved = Attempt.objects.filter(
        stage__run__subject__in=subjects, started_at__gte=started
    ).aggregate(
        tokens=Coalesce(Sum(F("saved_input_tokens") + F("saved_output_tokens")), 0),
        cost=Coalesce(Sum("saved_cost_usd"), Decimal(0)),
    )
    outcome.tokens_spent = int(totals["tokens"])
    outcome.cost_usd = totals["cost"]
    outcome.tokens_saved = int(saved["tokens"])
    outcome.saved_cost_usd = saved["cost"]
    return outcome
