"""The engine's public read API: what a domain may ask about its runs.

A domain knows its runs by their subject (an opaque string it chooses, indexed) or through a
foreign key to `Run` of its own. It reads runs, stages, attempts, outputs and spending through
these functions only, so that each join, each sum and each rule lives here once. Stage outputs
come back as the pydantic model their stage declares.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from django.db.models import (
    Count,
    F,
    Model,
    OuterRef,
    Prefetch,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
)
from django.db.models.functions import Coalesce
from django.utils import timezone
from pydantic import BaseModel, ConfigDict

from pipeline.core.models import Attempt, AuditEntry, Checkpoint, LLMCall, Run, Stage, Unit
from pipeline.core.states import StageStatus, UnitStatus
from pipeline.core.workflow import StageRef, workflow_get

OutputT = TypeVar("OutputT", bound=BaseModel)
M = TypeVar("M", bound=Model)

_ZERO_USD = Decimal("0")


# --- spending: the ledger and the attempts ---------------------------------------------------


def ledger_sums() -> dict[str, Any]:
    """The one definition of what LLM calls add up to: calls, tokens in and out, dollars.

    Every total over the ledger, whole or grouped (by stage, model, day), aggregates or
    annotates with these expressions."""
    return {
        "calls": Count("id"),
        "input_tokens": Coalesce(Sum("input_tokens"), 0),
        "output_tokens": Coalesce(Sum("output_tokens"), 0),
        "cost_usd": Coalesce(Sum("cost_usd"), Value(_ZERO_USD)),
    }


class AttemptSpend(BaseModel):
    """The one definition of what an attempt spends beside its model calls (the columns of
    `Attempt` with these names): audio and compute seconds, and what reuse spared it."""

    audio_seconds: float = 0.0
    compute_seconds: float = 0.0
    saved_input_tokens: int = 0
    saved_output_tokens: int = 0
    saved_cost_usd: Decimal = _ZERO_USD
    saved_audio_seconds: float = 0.0


def attempt_sums() -> dict[str, Any]:
    """What attempts add up to: the sum of each `AttemptSpend` field, zero when none."""
    return {
        name: Coalesce(Sum(name), Value(field.default))
        for name, field in AttemptSpend.model_fields.items()
    }


class LedgerTotals(BaseModel):
    """What some LLM calls add up to (the fields of `ledger_sums`)."""

    model_config = ConfigDict(frozen=True)

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal = _ZERO_USD

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class AttemptTotals(AttemptSpend):
    """What some attempts add up to (the fields of `attempt_sums`)."""

    model_config = ConfigDict(frozen=True)

    @property
    def audio_hours(self) -> float:
        return self.audio_seconds / 3600

    @property
    def saved_tokens(self) -> int:
        return self.saved_input_tokens + self.saved_output_tokens


class Usage(LedgerTotals, AttemptTotals):
    """What some runs spent (ledger and attempts), and what reuse spared them."""


def ledger_totals(calls: QuerySet[LLMCall]) -> dict[str, Any]:
    """The ledger sums of some calls, in one query."""
    return calls.order_by().aggregate(**ledger_sums())


def usage_totals(
    *,
    subjects: Sequence[str] | None = None,
    run_ids: Sequence[int] | None = None,
    stage_ids: Sequence[int] | None = None,
    since: datetime | None = None,
    ledger_only: bool = False,
) -> Usage:
    """Everything spent by the runs of `subjects`, or by `run_ids`, or to produce `stage_ids`
    (every attempt, every run, failed ones included); since a time if given. Two queries, one
    with `ledger_only` (tokens and dollars, for a budget check)."""
    scope = Q()
    if subjects is not None:
        scope &= Q(stage__run__subject__in=list(subjects))
    if run_ids is not None:
        scope &= Q(stage__run_id__in=list(run_ids))
    if stage_ids is not None:
        scope &= Q(stage_id__in=list(stage_ids))
    calls = LLMCall.objects.filter(scope)
    if since is not None:
        calls = calls.filter(created_at__gte=since)
    totals = ledger_totals(calls)
    if not ledger_only:
        attempts = Attempt.objects.filter(scope)
        if since is not None:
            attempts = attempts.filter(started_at__gte=since)
        totals |= attempts.order_by().aggregate(**attempt_sums())
    return Usage.model_validate(totals)


def stage_token_averages(workflow: str) -> dict[str, int]:
    """Average tokens one execution of each stage of `workflow` has cost so far (the ledger's
    tokens over the stages that made calls): what a re-run of it will likely cost."""
    rows = (
        LLMCall.objects.filter(stage__run__workflow=workflow)
        .order_by()
        .values(name=F("stage__name"))
        .annotate(stages=Count("stage", distinct=True), **ledger_sums())
    )
    return {
        r["name"]: round((r["input_tokens"] + r["output_tokens"]) / r["stages"])
        for r in rows
        if r["stages"]
    }


# --- runs, stages, outputs -------------------------------------------------------------------


def runs_of_subject(subject: str) -> list[Run]:
    """Every run of a subject, newest first."""
    return list(Run.objects.filter(subject=subject).order_by("-created_at", "-id"))


def run_input_values(subject: str, key: str) -> set[str]:
    """The strings a subject's runs name under `key` in their input (say, a recording each
    transcribes)."""
    values = Run.objects.filter(subject=subject).values_list(f"input__{key}", flat=True)
    return {value for value in values if isinstance(value, str) and value}


def run_input_users(key: str, values: Iterable[str], *, other_than: str) -> set[tuple[str, str]]:
    """(value, subject) of the runs of subjects other than `other_than` whose input names one
    of `values` under `key`."""
    rows = (
        Run.objects.exclude(subject=other_than)
        .filter(**{f"input__{key}__in": list(values)})
        .values_list(f"input__{key}", "subject")
    )
    return set(rows)


def runs_with_stages(subject: str, *, workflow: str) -> list[Run]:
    """A subject's runs of one workflow, oldest first, each with its stages (in order) and
    their attempts: three queries however many runs."""
    attempts = Prefetch("attempts", queryset=Attempt.objects.order_by("number"))
    stages = Prefetch(
        "stages", queryset=Stage.objects.order_by("position").prefetch_related(attempts)
    )
    return list(
        Run.objects.filter(subject=subject, workflow=workflow)
        .prefetch_related(stages)
        .order_by("created_at", "id")
    )


def audit_entries_of_subject(subject: str) -> list[AuditEntry]:
    """What operators did to a subject's runs (retry, re-run, cancel), newest first."""
    return list(AuditEntry.objects.filter(run__subject=subject).order_by("-created_at", "-id"))


def runs_labelled(label: str) -> list[Run]:
    """The runs an operator gave `label` (a batch re-run), oldest first, with the runs they
    were forked from."""
    return list(
        Run.objects.filter(label=label).select_related("forked_from").order_by("created_at", "id")
    )


def run_of_subject(subject: str, run_id: int) -> Run | None:
    """One run, only if it belongs to `subject` (what a domain checks before acting on it)."""
    return Run.objects.filter(subject=subject, id=run_id).first()


def run_stages(run_id: int) -> list[Stage]:
    """A run's stages in order, each with its attempts (oldest first) and reuse source."""
    attempts = Prefetch("attempts", queryset=Attempt.objects.order_by("number"))
    return list(
        Stage.objects.filter(run_id=run_id)
        .select_related("reused_from", "run")
        .prefetch_related(attempts)
        .order_by("position")
    )


def stage_units_done(run_id: int, ref: StageRef[Any]) -> list[Any]:
    """The results of the stage's finished units, in unit order: what a stage that is still
    running (a stream, say) has done so far."""
    units = Unit.objects.filter(stage__run_id=run_id, stage__name=ref.name, status=UnitStatus.DONE)
    keys = list(units.order_by("index").values_list("key", flat=True))
    kept = dict(
        Checkpoint.objects.filter(
            stage__run_id=run_id, stage__name=ref.name, key__in=keys
        ).values_list("key", "value")
    )
    return [kept[key] for key in keys if key in kept]


def output_of(stages: Sequence[Stage], ref: StageRef[OutputT]) -> OutputT | None:
    """The committed output of stage `ref` among already loaded `stages`, as its model."""
    for stage in stages:
        if stage.name == ref.name and stage.status == StageStatus.SUCCEEDED:
            spec = workflow_get(stage.run.workflow).stage(ref.name)
            return spec.output_load(stage.output, ref.output)
    return None


def stage_output(run: Run, ref: StageRef[OutputT]) -> OutputT | None:
    """The committed output of one stage of a run, as its model; None until it succeeds."""
    stage = (
        Stage.objects.filter(run=run, name=ref.name, status=StageStatus.SUCCEEDED)
        .select_related("run")
        .first()
    )
    return output_of([stage], ref) if stage else None


def run_succeeded_stage_names(run: Run) -> set[str]:
    """Names of the run's stages that have a committed output (their own or a reused one)."""
    return set(run.stages.filter(status=StageStatus.SUCCEEDED).values_list("name", flat=True))


def run_failed_stage(run: Run) -> Stage | None:
    """The stage that failed the run (the first, should there be more), or None."""
    return run.stages.filter(status=StageStatus.FAILED).order_by("position").first()


# --- domain lists joined through a foreign key to Run ----------------------------------------


def with_failed_stage(queryset: QuerySet[M], *, via: str) -> QuerySet[M]:
    """Annotate rows of a domain model with the name and error code of the failed stage of the
    run their foreign key `via` points at: `failed_stage_name`, `failed_error_code`."""
    failed = Stage.objects.filter(run=OuterRef(via), status=StageStatus.FAILED).order_by("position")
    annotated: QuerySet[M] = queryset.annotate(
        failed_stage_name=Subquery(failed.values("name")[:1]),
        failed_error_code=Subquery(failed.values("error_code")[:1]),
        failed_kind=Subquery(failed.values("failure_kind")[:1]),
    )
    return annotated


def filter_failed_at(
    queryset: QuerySet[M],
    *,
    via: str,
    stage_name: str | None = None,
    error_code: str | None = None,
    failure_kind: str | None = None,
) -> QuerySet[M]:
    """Rows whose run (foreign key `via`) has a failed stage matching what is given."""
    prefix = f"{via}__stages__"
    conditions: dict[str, str] = {f"{prefix}status": StageStatus.FAILED}
    for field, value in (
        ("name", stage_name),
        ("error_code", error_code),
        ("failure_kind", failure_kind),
    ):
        if value is not None:
            conditions[prefix + field] = value
    return queryset.filter(**conditions).distinct()


STAGE_STATES = {
    "failed": "Failed",
    "retrying": "Retrying (waiting out a backoff)",
    "stuck": "Stuck (lease expired, not yet swept)",
    "running": "Running",
}


def filter_stage_state(queryset: QuerySet[M], state: str | None, *, prefix: str) -> QuerySet[M]:
    """Keep rows whose stage (reached through `prefix`, e.g. 'current_run__stages__') is in
    one of the `STAGE_STATES`; any other value leaves the queryset as it is."""
    now = timezone.now()
    conditions: dict[str, dict[str, Any]] = {
        "failed": {"status": StageStatus.FAILED},
        "retrying": {
            "status": StageStatus.READY,
            "attempt_count__gt": 0,
            "next_attempt_at__gt": now,
        },
        "stuck": {"status": StageStatus.RUNNING, "lease_expires_at__lt": now},
        "running": {"status": StageStatus.RUNNING},
    }
    if state not in conditions:
        return queryset
    return queryset.filter(
        **{prefix + key: value for key, value in conditions[state].items()}
    ).distinct()


def failed_error_codes() -> list[str]:
    """Error codes of failed stages, for a filter's choices."""
    return list(
        Stage.objects.filter(status=StageStatus.FAILED)
        .exclude(error_code="")
        .order_by("error_code")
        .values_list("error_code", flat=True)
        .distinct()
    )


class Erasable(BaseModel):
    """What of its subject a set of runs still holds (`store.runs_erase` would remove it)."""

    checkpoints: int
    llm_answers: int
    outputs: int


def runs_erasable(run_ids: Sequence[int], *, outputs_kept: Sequence[str]) -> Erasable:
    return Erasable(
        checkpoints=Checkpoint.objects.filter(stage__run_id__in=run_ids).count(),
        llm_answers=LLMCall.objects.filter(stage__run_id__in=run_ids).exclude(content="").count(),
        outputs=Stage.objects.filter(run_id__in=run_ids, output__isnull=False)
        .exclude(name__in=outputs_kept)
        .count(),
    )
