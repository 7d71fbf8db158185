"""The only module that writes runs, stages, attempts, units, checkpoints and LLM calls.

It records what it is told: `pipeline.core.policy` decides whether and when a failed stage is tried
again, and the store writes that decision down. Others read through `pipeline.core.selectors`.

Every transition is a short transaction whose WHERE clause is the fence: a stage is claimed only
if it is still ready, completed or failed only by the attempt that holds its lease. That is
what makes a duplicate delivery, a zombie worker or a racing sweep harmless.

Time here is the database's: leases, deadlines and retry times are set and compared on the one
clock every host shares (`Now()` in SQL, or `db_now()` where Python does the arithmetic), so a
host whose clock is skewed can neither take a live lease nor keep an expired one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError, InterfaceError, OperationalError, connection, transaction
from django.db.models import Count, F, Q, QuerySet
from django.db.models.functions import Coalesce, Now
from django.db.models.sql import Query
from pydantic import ConfigDict

from pipeline.core import policy
from pipeline.core.errors import AttemptTimedOut, LeaseLost
from pipeline.core.models import Attempt, AuditEntry, Checkpoint, LLMCall, Run, Stage, Unit
from pipeline.core.policy import Decision, Failure
from pipeline.core.selectors import AttemptSpend, usage_totals
from pipeline.core.states import AttemptStatus, RunStatus, StageStatus, UnitStatus
from pipeline.core.workflow import StageSpec, Workflow, stage_spec


@dataclass(frozen=True)
class Claim:
    """What a worker holds while it runs one attempt of a stage."""

    stage_id: int
    run_id: int
    workflow: str
    stage_name: str
    position: int
    attempt_id: int
    attempt_number: int
    worker: str
    started_at: datetime
    deadline: datetime
    run_input: dict[str, Any]
    subject: str  # the run's subject: what spend limits and ownership are counted by

    @property
    def spec(self) -> StageSpec:
        return stage_spec(self.workflow, self.stage_name)


class AttemptUsage(AttemptSpend):
    """What an attempt spent, and what reuse spared it; accumulated while it runs."""

    model_config = ConfigDict(validate_assignment=True)

    def columns(self) -> dict[str, Any]:
        """The attempt's columns, to write when it ends: what it spent, and its savings added
        to those the claim recorded (a reused output is counted when the stage is claimed)."""
        spent = self.model_dump()
        return {
            name: F(name) + value if name.startswith("saved_") else value
            for name, value in spent.items()
        }


def _lease_seconds() -> float:
    return float(settings.PIPELINE_LEASE_SECONDS)


def db_now() -> datetime:
    """The database's clock, the one every host shares, read in one round trip."""
    now = Now()
    sql, params = Query(None).get_compiler(connection=connection).compile(now)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {sql}", params)
        row = cursor.fetchone()
    value = row[0]
    for convert in connection.ops.get_db_converters(now):
        value = convert(value, now, connection)
    assert isinstance(value, datetime)
    return value


def _spec(stage: Stage) -> StageSpec:
    return stage_spec(stage.run.workflow, stage.name)


# --- runs ------------------------------------------------------------------------------------


def run_create(
    *,
    workflow: Workflow,
    subject: str,
    input: dict[str, Any],
    forked_from: Run | None = None,
    fork_stage: str = "",
    label: str = "",
) -> Run:
    """Create a run and its stages. Stages before `fork_stage` reuse `forked_from`'s outputs."""
    now = db_now()
    with transaction.atomic():
        run = Run.objects.create(
            workflow=workflow.name,
            subject=subject,
            input=input,
            forked_from=forked_from,
            fork_stage=fork_stage,
            label=label,
        )
        reused: dict[str, Stage] = {}
        # A stream the source run sealed is whole: its fork reads it again, sealed.
        sealed: dict[str, datetime | None] = {}
        if forked_from is not None:
            sealed = dict(forked_from.stages.values_list("name", "input_sealed_at"))
            fork_at = workflow.stage_names.index(fork_stage)
            reused = {
                stage.name: stage
                for stage in forked_from.stages.filter(
                    name__in=workflow.stage_names[:fork_at], status=StageStatus.SUCCEEDED
                )
            }
        rows = []
        first_open = True
        for position, spec in enumerate(workflow.stages):
            source = reused.get(spec.name)
            if source is not None:
                rows.append(
                    Stage(
                        run=run,
                        name=spec.name,
                        position=position,
                        status=StageStatus.SUCCEEDED,
                        output=source.output,
                        flagged=source.flagged,
                        reused_from=source.reused_from or source,
                        started_at=now,
                        finished_at=now,
                    )
                )
                continue
            rows.append(
                Stage(
                    run=run,
                    name=spec.name,
                    position=position,
                    status=StageStatus.READY if first_open else StageStatus.PENDING,
                    next_attempt_at=now if first_open else None,
                    input_sealed_at=sealed.get(spec.name),
                )
            )
            first_open = False
        Stage.objects.bulk_create(rows)
    return run


def run_ready_stages(run_id: int) -> list[Stage]:
    return list(Stage.objects.filter(run_id=run_id, status=StageStatus.READY).select_related("run"))


def run_mark_cancelled(*, run: Run, reason: str) -> bool:
    """Cancel every stage not yet finished. A running attempt is fenced out at its next write."""
    with transaction.atomic():
        updated = Run.objects.filter(
            id=run.id, status__in=[RunStatus.QUEUED, RunStatus.RUNNING]
        ).update(status=RunStatus.CANCELLED, error=reason, finished_at=Now())
        if not updated:
            return False
        open_stages = Stage.objects.filter(
            run_id=run.id,
            status__in=[StageStatus.PENDING, StageStatus.READY, StageStatus.RUNNING],
        )
        Attempt.objects.filter(stage__in=open_stages, status=AttemptStatus.RUNNING).update(
            status=AttemptStatus.CANCELLED, finished_at=Now(), error_message=reason
        )
        open_stages.update(
            status=StageStatus.CANCELLED,
            lease_owner="",
            lease_expires_at=None,
            error_message=reason,
            finished_at=Now(),
        )
    return True


def stage_reopen_failed(*, run: Run) -> Stage | None:
    """Give the run's failed stage one more attempt; everything before it stays as it is."""
    with transaction.atomic():
        stage = (
            Stage.objects.select_for_update()
            .filter(run_id=run.id, status=StageStatus.FAILED)
            .annotate(db_now=Now())
            .order_by("position")
            .first()
        )
        if stage is None:
            return None
        stage.status = StageStatus.READY
        stage.failure_kind = ""
        stage.next_attempt_at = stage.db_now
        stage.enqueued_at = None
        stage.finished_at = None
        stage.save(
            update_fields=[
                "status",
                "failure_kind",
                "next_attempt_at",
                "enqueued_at",
                "finished_at",
            ]
        )
        Run.objects.filter(id=run.id).update(status=RunStatus.RUNNING, error="", finished_at=None)
    return stage


def stage_skip_backoff(*, stage: Stage) -> bool:
    """Skip what remains of a ready stage's backoff."""
    return bool(
        Stage.objects.filter(id=stage.id, status=StageStatus.READY).update(
            next_attempt_at=Now(), enqueued_at=None
        )
    )


def audit_record(
    *,
    action: str,
    operator: Any,
    run: Run,
    reason: str,
    stage: str = "",
    new_run: Run | None = None,
) -> AuditEntry:
    return AuditEntry.objects.create(
        action=action,
        actor=operator.user,
        actor_label=operator.label,
        run=run,
        new_run=new_run,
        stage=stage,
        reason=reason,
    )


# --- claiming and running one attempt -------------------------------------------------------


def stage_claim(*, stage_id: int, worker: str, due_only: bool = True) -> Claim | None:
    """Take the lease on a ready, due stage and open its next attempt; None if not ours to run.
    With `due_only=False` a backoff not yet over is no obstacle (Temporal has timed it).

    PostgreSQL locks the row with SKIP LOCKED so that racing workers never wait on each other;
    elsewhere the conditional UPDATE alone decides who wins."""
    stage = Stage.objects.select_related("run").filter(id=stage_id).annotate(db_now=Now()).first()
    if stage is None or stage.status != StageStatus.READY:
        return None
    now: datetime = stage.db_now  # read with the row: the attempt's start and deadline
    if due_only and stage.next_attempt_at is not None and stage.next_attempt_at > now:
        return None
    deadline = policy.attempt_deadline(_spec(stage).policy, started_at=now)
    lease_until = policy.lease_until(now=now, deadline=deadline, lease_seconds=_lease_seconds())
    number = stage.attempt_count + 1
    with transaction.atomic():
        claimable = Stage.objects.filter(
            id=stage_id, status=StageStatus.READY, attempt_count=stage.attempt_count
        )
        if connection.features.has_select_for_update_skip_locked:
            locked = claimable.select_for_update(skip_locked=True).values_list("id", flat=True)
            if not list(locked):
                return None
        updated = claimable.update(
            status=StageStatus.RUNNING,
            attempt_count=number,
            lease_owner=worker,
            lease_expires_at=lease_until,
            progress_done=0,
            progress_total=None,
            started_at=Coalesce(F("started_at"), now),
        )
        if not updated:
            return None
        attempt = Attempt.objects.create(
            stage_id=stage_id, number=number, worker=worker, started_at=now
        )
        if number > 1 or (stage.run.forked_from_id and stage.name == stage.run.fork_stage):
            # A run from scratch would produce the earlier stages again; this attempt reuses them.
            Attempt.objects.filter(id=attempt.id).update(
                **_cost_of_stages_before(stage.run_id, stage.position)
            )
        Run.objects.filter(id=stage.run_id, status=RunStatus.QUEUED).update(
            status=RunStatus.RUNNING, started_at=now
        )
    return Claim(
        stage_id=stage_id,
        run_id=stage.run_id,
        workflow=stage.run.workflow,
        stage_name=stage.name,
        position=stage.position,
        attempt_id=attempt.id,
        attempt_number=number,
        worker=worker,
        started_at=now,
        deadline=deadline,
        run_input=stage.run.input,
        subject=stage.run.subject,
    )


def _held(claim: Claim) -> QuerySet[Stage]:
    """The stage row, only while `claim` still holds an unexpired lease on it."""
    return Stage.objects.filter(
        id=claim.stage_id,
        status=StageStatus.RUNNING,
        attempt_count=claim.attempt_number,
        lease_expires_at__gte=Now(),
    )


def stage_heartbeat(claim: Claim) -> None:
    """Extend the lease (never past the attempt's deadline); raise if it is no longer ours."""
    now = db_now()
    if now >= claim.deadline:
        raise AttemptTimedOut(f"stage {claim.stage_name} ran past its start-to-close timeout")
    until = policy.lease_until(now=now, deadline=claim.deadline, lease_seconds=_lease_seconds())
    if not _held(claim).update(lease_expires_at=until):
        raise LeaseLost(
            f"attempt {claim.attempt_number} of {claim.stage_name} lost its lease "
            "(expired, cancelled, or taken by a newer attempt)"
        )


def stage_progress_save(claim: Claim, *, done: int, total: int | None) -> None:
    """Note how far the attempt has got; only while it holds its lease (a zombie's progress
    would be a lie)."""
    if not _held(claim).update(progress_done=done, progress_total=total):
        raise LeaseLost(f"attempt {claim.attempt_number} of {claim.stage_name} lost its lease")


def attempt_complete(
    claim: Claim, *, output: dict[str, Any], usage: AttemptUsage | None = None
) -> Stage | None:
    """Commit the output and `succeeded` together; open the next stage and return it."""
    spec = claim.spec
    # The executor validated `output` already; read it back only for the spec's own readers.
    wanted = spec.output is not None and (spec.on_success or spec.flagged)
    model = spec.output.model_validate(output) if wanted and spec.output else None
    with transaction.atomic():
        if not _held(claim).update(
            status=StageStatus.SUCCEEDED,
            output=output,
            flagged=spec.flagged(model) if spec.flagged is not None else 0,
            finished_at=Now(),
            lease_owner="",
            lease_expires_at=None,
            error_code="",
            error_message="",
        ):
            raise LeaseLost(
                f"attempt {claim.attempt_number} of {claim.stage_name} finished after losing "
                "its lease; its output was discarded"
            )
        Attempt.objects.filter(id=claim.attempt_id).update(
            status=AttemptStatus.SUCCEEDED, finished_at=Now(), **(usage or AttemptUsage()).columns()
        )
        if spec.on_success is not None:
            spec.on_success(Run.objects.get(id=claim.run_id), model)
        next_stage = stage_after(claim)
        if next_stage is None:
            Run.objects.filter(id=claim.run_id, status=RunStatus.RUNNING).update(
                status=RunStatus.SUCCEEDED, finished_at=Now()
            )
            return None
        Stage.objects.filter(id=next_stage.id, status=StageStatus.PENDING).update(
            status=StageStatus.READY, next_attempt_at=Now(), enqueued_at=None
        )
        return next_stage


def attempt_succeeded(claim: Claim) -> bool:
    """Whether the attempt's completion is committed. A database error while completing leaves
    that unknown: COMMIT may have reached the database and only its acknowledgement been lost.
    Raises while the database cannot be reached, when the outcome is still unknown."""
    if not connection.in_atomic_block:
        # The error may have left this connection dead; a fresh one can answer.
        connection.close_if_unusable_or_obsolete()
    return Attempt.objects.filter(id=claim.attempt_id, status=AttemptStatus.SUCCEEDED).exists()


def stage_after(claim: Claim) -> Stage | None:
    """The stage that follows the claim's: the first later one without a committed output."""
    return (
        Stage.objects.filter(run_id=claim.run_id, position__gt=claim.position)
        .exclude(status=StageStatus.SUCCEEDED)
        .order_by("position")
        .only("id", "name")
        .first()
    )


def attempt_fail(
    claim: Claim, failure: Failure, decision: Decision, *, usage: AttemptUsage | None = None
) -> Stage | None:
    """Record a failed attempt and what the policy decided: the next attempt's time, or the
    stage's end. None if this attempt was fenced out."""
    with transaction.atomic():
        stage = (
            Stage.objects.select_for_update()
            .select_related("run")
            .filter(
                id=claim.stage_id,
                status=StageStatus.RUNNING,
                attempt_count=claim.attempt_number,
            )
            .annotate(db_now=Now())
            .first()
        )
        if stage is None:
            return None
        now: datetime = stage.db_now
        Attempt.objects.filter(id=claim.attempt_id).update(
            status=AttemptStatus.FAILED,
            finished_at=now,
            error_code=failure.code[:64],
            error_message=failure.message,
            traceback=failure.traceback,
            **(usage or AttemptUsage()).columns(),
        )
        _stage_record_failure(stage, failure, decision, now)
    return stage


def _stage_record_failure(
    stage: Stage, failure: Failure, decision: Decision, now: datetime
) -> None:
    stage.error_code = failure.code[:64]
    stage.error_message = decision.message
    stage.lease_owner = ""
    stage.lease_expires_at = None
    if decision.retry_in_seconds is not None:
        stage.status = StageStatus.READY
        stage.next_attempt_at = now + timedelta(seconds=decision.retry_in_seconds)
        stage.enqueued_at = None
    else:
        stage.status = StageStatus.FAILED
        stage.failure_kind = decision.gave_up or ""
        stage.finished_at = now
        Run.objects.filter(id=stage.run_id).exclude(status=RunStatus.CANCELLED).update(
            status=RunStatus.FAILED,
            error=f"{stage.name}: {stage.error_message}",
            finished_at=now,
        )
    stage.save()


# --- recovery -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpiredLease:
    """A running stage whose worker stopped heartbeating, as found by the sweep."""

    stage_id: int
    run_id: int
    workflow: str
    stage_name: str
    attempt_number: int
    worker: str
    lease_expires_at: datetime
    attempt_started_at: datetime

    @property
    def spec(self) -> StageSpec:
        return stage_spec(self.workflow, self.stage_name)


def stages_lease_expired() -> list[ExpiredLease]:
    """Running stages whose lease has expired, with what the policy needs to judge them."""
    rows = list(
        Stage.objects.filter(status=StageStatus.RUNNING, lease_expires_at__lt=Now()).values(
            "id",
            "run_id",
            "run__workflow",
            "name",
            "attempt_count",
            "lease_owner",
            "lease_expires_at",
        )
    )
    started = dict(
        Attempt.objects.filter(
            stage_id__in=[row["id"] for row in rows], status=AttemptStatus.RUNNING
        ).values_list("stage_id", "started_at")
    )
    expired = []
    for row in rows:
        lease_expires_at = row["lease_expires_at"]
        assert lease_expires_at is not None  # the filter above is lease_expires_at__lt=Now()
        expired.append(
            ExpiredLease(
                stage_id=row["id"],
                run_id=row["run_id"],
                workflow=row["run__workflow"],
                stage_name=row["name"],
                attempt_number=row["attempt_count"],
                worker=row["lease_owner"],
                lease_expires_at=lease_expires_at,
                attempt_started_at=started.get(row["id"], lease_expires_at),
            )
        )
    return expired


def stage_reap(expired: ExpiredLease, failure: Failure, decision: Decision) -> Stage | None:
    """Take a stage back from its vanished worker: its attempt is marked lost and the stage
    retried or failed as decided. None if it moved on meanwhile (the worker came back)."""
    with transaction.atomic():
        stage = (
            Stage.objects.select_for_update()
            .filter(
                id=expired.stage_id,
                status=StageStatus.RUNNING,
                attempt_count=expired.attempt_number,
                lease_expires_at__lt=Now(),
            )
            .annotate(db_now=Now())
            .first()
        )
        if stage is None:
            return None
        now: datetime = stage.db_now
        Attempt.objects.filter(
            stage=stage, number=expired.attempt_number, status=AttemptStatus.RUNNING
        ).update(
            status=AttemptStatus.LOST,
            finished_at=now,
            error_code=failure.code,
            error_message=failure.message,
        )
        _stage_record_failure(stage, failure, decision, now)
    return stage


def stages_due(*, requeue_after_seconds: float) -> list[Stage]:
    """Ready stages whose time has come and that no live queue message is known to carry."""
    now = db_now()
    stale = now - timedelta(seconds=requeue_after_seconds)
    return list(
        Stage.objects.filter(status=StageStatus.READY, next_attempt_at__lte=now)
        .filter(Q(enqueued_at__isnull=True) | Q(enqueued_at__lt=stale))
        .select_related("run")
        .order_by("next_attempt_at")
    )


def stages_mark_enqueued(stage_ids: list[int]) -> list[Stage]:
    """Note that a wake-up message is on its way for these stages; return them with their run."""
    stages = list(Stage.objects.filter(id__in=stage_ids).select_related("run"))
    Stage.objects.filter(id__in=[stage.id for stage in stages]).update(enqueued_at=Now())
    return stages


def runs_erase(
    *,
    run_ids: Sequence[int],
    outputs_kept: Sequence[str],
    placeholders: dict[str, dict[str, Any]],
    reason: str,
) -> None:
    """Erase what runs hold of their subject (a domain's retention): cancel any still going,
    delete their checkpoints and units, empty the model's answers and every stage output but
    `outputs_kept` (to its `placeholders` entry, or to nothing). The ledger's tokens, cost and
    model, the attempts and the audit entries stay: they are figures, not the subject's data.
    Call it inside the domain's transaction."""
    for run in Run.objects.filter(id__in=run_ids, status__in=[RunStatus.QUEUED, RunStatus.RUNNING]):
        run_mark_cancelled(run=run, reason=reason)
    Checkpoint.objects.filter(stage__run_id__in=run_ids).delete()
    Unit.objects.filter(stage__run_id__in=run_ids).delete()
    LLMCall.objects.filter(stage__run_id__in=run_ids).update(content="")
    outputs = Stage.objects.filter(run_id__in=run_ids, output__isnull=False).exclude(
        name__in=outputs_kept
    )
    for name, placeholder in placeholders.items():
        outputs.filter(name=name).update(output=placeholder)
    outputs.exclude(name__in=placeholders).update(output=None)


# --- inside an attempt: checkpoints and the LLM ledger --------------------------------------


def checkpoint_save(claim: Claim, *, key: str, value: Any) -> None:
    """Keep a finished piece of work, only while this attempt still holds the lease."""
    with transaction.atomic():
        if not _held(claim).exists():
            raise LeaseLost(f"attempt {claim.attempt_number} of {claim.stage_name} lost its lease")
        try:
            with transaction.atomic():
                Checkpoint.objects.create(
                    stage_id=claim.stage_id,
                    key=key,
                    value=value,
                    attempt_number=claim.attempt_number,
                )
        except IntegrityError:
            pass  # the same piece was already kept: identical work, nothing to add


def checkpoints_load(claim: Claim, *, prefix: str = "") -> dict[str, Any]:
    rows = Checkpoint.objects.filter(stage_id=claim.stage_id, key__startswith=prefix)
    return dict(rows.values_list("key", "value"))


# --- inside an attempt: the parallel units of a stage that fans out ------------------------


@dataclass(frozen=True)
class UnitClaim:
    """A worker's lease on one unit: what it needs to do the unit and to fence its result."""

    unit_id: int
    stage_id: int
    run_id: int
    workflow: str
    stage_name: str
    key: str
    input: dict[str, Any]
    attempt_number: int  # the stage attempt the unit belongs to
    try_number: int
    worker: str
    run_input: dict[str, Any]
    subject: str

    @property
    def spec(self) -> StageSpec:
        return stage_spec(self.workflow, self.stage_name)


@dataclass(frozen=True)
class UnitsState:
    """Where the units of an attempt stand. A unit whose lease expired counts as ready."""

    ready: int
    running: int
    done: int
    failed: list[Unit]


def units_plan(claim: Claim, items: list[tuple[int, str, dict[str, Any]]]) -> None:
    """Give this attempt the units it still needs, each (index, key, input): new ones, and those
    an earlier attempt planned but did not finish (whose workers are fenced out from now on)."""
    with transaction.atomic():
        if not _held(claim).exists():
            raise LeaseLost(f"attempt {claim.attempt_number} of {claim.stage_name} lost its lease")
        for index, key, value in items:
            Unit.objects.update_or_create(
                stage_id=claim.stage_id,
                key=key,
                defaults={
                    "index": index,
                    "input": value,
                    "attempt_number": claim.attempt_number,
                    "status": UnitStatus.READY,
                    "worker": "",
                    "lease_expires_at": None,
                    "error_code": "",
                    "error_message": "",
                    "retryable": True,
                },
            )


def stage_seal(*, run_id: int, stage_name: str) -> bool:
    """Say that no more units will arrive for the run's stage; False if it was already said
    (or the stage is not the run's). Allowed before the stage opens."""
    return bool(
        Stage.objects.filter(run_id=run_id, name=stage_name, input_sealed_at__isnull=True).update(
            input_sealed_at=Now()
        )
    )


def stage_sealed(claim: Claim) -> bool:
    return Stage.objects.filter(id=claim.stage_id, input_sealed_at__isnull=False).exists()


def _stage_run_by(stage_id: int, attempt_number: int) -> QuerySet[Stage, Any]:
    return Stage.objects.filter(
        id=stage_id, status=StageStatus.RUNNING, attempt_count=attempt_number
    ).values("id")


def unit_claim(*, stage_id: int, worker: str) -> UnitClaim | None:
    """Take the lease on the stage's next unit to do (ready, or given up by a worker that
    stopped heartbeating); None when there is none, or the stage is not running.

    The fencing conditions are on the unit's own row (the stage's go in a subquery): when two
    workers race for a unit, PostgreSQL re-checks them on the row the winner wrote, so the
    loser updates nothing. Conditions reached through a join would not be re-checked."""
    stage = Stage.objects.filter(id=stage_id, status=StageStatus.RUNNING).first()
    if stage is None:
        return None
    claimable = Unit.objects.filter(
        Q(status=UnitStatus.READY) | Q(status=UnitStatus.RUNNING, lease_expires_at__lt=Now()),
        stage_id=stage_id,
        attempt_number=stage.attempt_count,
    )
    skip_locked = connection.features.has_select_for_update_skip_locked
    while True:  # a lost race means another worker took that unit: look for the next one
        with transaction.atomic():
            # PostgreSQL: each worker locks the first unit nobody else is locking, so racing
            # workers take different units instead of colliding on the same one.
            candidates = claimable.order_by("index")
            if skip_locked:
                candidates = candidates.select_for_update(skip_locked=True)
            unit = candidates.first()
            if unit is None:
                return None
            taken = claimable.filter(
                id=unit.id,
                tries=unit.tries,
                stage_id__in=_stage_run_by(stage_id, stage.attempt_count),
            ).update(
                status=UnitStatus.RUNNING,
                worker=worker,
                lease_expires_at=Now() + timedelta(seconds=_lease_seconds()),
                tries=unit.tries + 1,
                started_at=Now(),
            )
        if taken:
            run = Run.objects.only("workflow", "input", "subject").get(id=stage.run_id)
            return UnitClaim(
                unit_id=unit.id,
                stage_id=stage_id,
                run_id=stage.run_id,
                workflow=run.workflow,
                stage_name=stage.name,
                key=unit.key,
                input=unit.input,
                attempt_number=unit.attempt_number,
                try_number=unit.tries + 1,
                worker=worker,
                run_input=run.input,
                subject=run.subject,
            )


def _unit_held(claim: UnitClaim) -> QuerySet[Unit]:
    """The unit, only while `claim` holds its unexpired lease and its attempt runs the stage
    (row conditions, re-checked under a concurrent write: see `unit_claim`)."""
    return Unit.objects.filter(
        id=claim.unit_id,
        attempt_number=claim.attempt_number,
        status=UnitStatus.RUNNING,
        worker=claim.worker,
        tries=claim.try_number,
        lease_expires_at__gte=Now(),
        stage_id__in=_stage_run_by(claim.stage_id, claim.attempt_number),
    )


def unit_heartbeat(claim: UnitClaim) -> None:
    until = Now() + timedelta(seconds=_lease_seconds())
    if not _unit_held(claim).update(lease_expires_at=until):
        raise LeaseLost(f"unit {claim.key} of {claim.stage_name} lost its lease")


def unit_complete(claim: UnitClaim, *, value: Any, seconds: float) -> bool:
    """Keep a unit's result as the stage's checkpoint; False if the lease was lost first (a
    zombie's result is discarded, the unit's new owner writes its own)."""
    with transaction.atomic():
        if not _unit_held(claim).update(
            status=UnitStatus.DONE,
            lease_expires_at=None,
            finished_at=Now(),
            seconds=seconds,
        ):
            return False
        try:
            with transaction.atomic():
                Checkpoint.objects.create(
                    stage_id=claim.stage_id,
                    key=claim.key,
                    value=value,
                    attempt_number=claim.attempt_number,
                )
        except IntegrityError:
            pass  # the same piece was already kept: identical work, nothing to add
    return True


def unit_fail(claim: UnitClaim, failure: Failure, *, seconds: float) -> bool:
    """Record why a unit failed; its stage's attempt fails with that error once the units
    still running have finished. False if the lease was lost first."""
    return bool(
        _unit_held(claim).update(
            status=UnitStatus.FAILED,
            lease_expires_at=None,
            finished_at=Now(),
            seconds=seconds,
            error_code=failure.code,
            error_message=failure.message,
            retryable=failure.retryable,
        )
    )


def units_state(claim: Claim) -> UnitsState:
    units = Unit.objects.filter(stage_id=claim.stage_id, attempt_number=claim.attempt_number)
    running = Q(status=UnitStatus.RUNNING)
    counts = units.aggregate(
        ready=Count(
            "id", filter=Q(status=UnitStatus.READY) | running & Q(lease_expires_at__lt=Now())
        ),
        running=Count("id", filter=running & Q(lease_expires_at__gte=Now())),
        done=Count("id", filter=Q(status=UnitStatus.DONE)),
        failed=Count("id", filter=Q(status=UnitStatus.FAILED)),
    )
    failed = units.filter(status=UnitStatus.FAILED).order_by("index") if counts["failed"] else []
    return UnitsState(
        ready=counts["ready"], running=counts["running"], done=counts["done"], failed=list(failed)
    )


def llm_call_find(claim: Claim, *, digest: str) -> LLMCall | None:
    """The answer recorded first for this request in the claim's stage, if any."""
    return LLMCall.objects.filter(
        stage_id=claim.stage_id, digest=digest, duplicate_of__isnull=True
    ).first()


def llm_call_record(
    claim: Claim,
    *,
    digest: str,
    model: str,
    content: str,
    input_tokens: int,
    output_tokens: int,
    cost_usd: Decimal,
    duration_ms: int,
) -> str:
    """Put an answered call in the ledger and on its attempt; return the answer to go on with.

    Tokens were spent whether or not this attempt still holds its lease, so this write is
    deliberately not fenced. If another attempt of the stage recorded an answer to the same
    request first, this one is kept as a duplicate (it was billed too) and the first answer is
    returned, so that the stage goes on with one answer whichever attempt finishes it.

    An answer that is paid for but not recorded would be bought again by the next attempt, so a
    dropped database connection gets one more try on a fresh connection."""
    row = {
        "digest": digest,
        "model": model,
        "content": content,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cost_usd": cost_usd,
        "duration_ms": duration_ms,
    }
    try:
        return _llm_call_insert(claim, row)
    except (OperationalError, InterfaceError):
        if connection.in_atomic_block:
            raise
        connection.close()
        return _llm_call_insert(claim, row)


def _llm_call_insert(claim: Claim, row: dict[str, Any]) -> str:
    answers = LLMCall.objects.filter(stage_id=claim.stage_id, digest=row["digest"])
    mine = {"stage_id": claim.stage_id, "attempt_id": claim.attempt_id, **row}
    with transaction.atomic():
        try:
            with transaction.atomic():
                LLMCall.objects.create(**mine)
            answer: str = row["content"]
        except IntegrityError:
            first = answers.filter(duplicate_of__isnull=True).first()
            if first is None:
                raise  # not the memo's constraint: nothing to resolve here
            if answers.filter(attempt_id=claim.attempt_id).exists():
                # The first try of this insert committed although its connection dropped:
                # this answer is in the ledger and on the attempt already.
                return first.content
            LLMCall.objects.create(duplicate_of=first, **mine)
            answer = first.content
        Attempt.objects.filter(id=claim.attempt_id).update(
            input_tokens=F("input_tokens") + row["input_tokens"],
            output_tokens=F("output_tokens") + row["output_tokens"],
            cost_usd=F("cost_usd") + row["cost_usd"],
        )
    return answer


def _cost_of_stages_before(run_id: int, position: int) -> dict[str, Any]:
    """What producing the outputs of a run's earlier stages cost (a fork's reused ones too)."""
    earlier = Stage.objects.filter(run_id=run_id, position__lt=position).values_list(
        "id", "reused_from_id"
    )
    spent = usage_totals(stage_ids=[reused_from or stage_id for stage_id, reused_from in earlier])
    return {
        "saved_input_tokens": spent.input_tokens,
        "saved_output_tokens": spent.output_tokens,
        "saved_cost_usd": spent.cost_usd,
        "saved_audio_seconds": spent.audio_seconds,
    }


def stage_outputs(run_id: int, *, before_position: int) -> dict[str, Any]:
    """Committed outputs of the stages before a position: what a stage may read."""
    rows = Stage.objects.filter(
        run_id=run_id, position__lt=before_position, status=StageStatus.SUCCEEDED
    ).values_list("name", "output")
    return dict(rows)
