"""What an operator may do to a run: retry, run now, re-run from a stage, cancel.

Each operation is audited (who, when, on what, why) in the same transaction as the change it
makes. Deciding *who* may operate is the domain's job; this module records who did."""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from typing import Any

from django.db import transaction

from pipeline.core import dispatch, executor, store
from pipeline.core.errors import OperationRefused
from pipeline.core.models import OperatorAction, Run, Stage
from pipeline.core.selectors import run_failed_stage, run_succeeded_stage_names
from pipeline.core.states import RunStatus
from pipeline.core.workflow import workflow_get


@dataclass(frozen=True)
class Operator:
    user: Any  # a user row, or None for a shell operator
    label: str

    @classmethod
    def for_user(cls, user: Any) -> Operator:
        return cls(user=user, label=user.get_username())

    @classmethod
    def command_line(cls) -> Operator:
        return cls(user=None, label=f"cli:{getpass.getuser()}")


def _reason(reason: str) -> str:
    reason = reason.strip()
    if not reason:
        raise OperationRefused("Say why: a reason is required for the audit trail.")
    return reason


def run_start(run: Run, *, inline: bool = False) -> None:
    """Set a run going from its ready stages: a wake-up message each once the caller's
    transaction commits, or (`inline`) here in this process until the run stops."""
    if inline:
        executor.run_execute_inline(run)
    else:
        dispatch.stage_enqueue([stage.id for stage in store.run_ready_stages(run.id)])


def run_retry_failed(*, run: Run, operator: Operator, reason: str, inline: bool = False) -> Stage:
    """Same run, one more attempt at its failed stage; earlier outputs and answered LLM calls
    are reused."""
    reason = _reason(reason)
    with transaction.atomic():
        stage = store.stage_reopen_failed(run=run)
        if stage is None:
            raise OperationRefused(
                f"Run {run.pk} has no failed stage to retry (it is {run.status})."
            )
        store.audit_record(
            action=OperatorAction.RETRY, operator=operator, run=run, stage=stage.name, reason=reason
        )
    run_start(run, inline=inline)
    return stage


def run_skip_backoff(*, run: Run, operator: Operator, reason: str) -> list[Stage]:
    """Run now: skip what is left of the backoff of every ready stage of the run."""
    reason = _reason(reason)
    with transaction.atomic():
        waiting = [s for s in store.run_ready_stages(run.id) if store.stage_skip_backoff(stage=s)]
        if not waiting:
            raise OperationRefused(f"Run {run.pk} has no stage waiting for a retry.")
        store.audit_record(
            action=OperatorAction.RUN_NOW,
            operator=operator,
            run=run,
            stage=", ".join(s.name for s in waiting),
            reason=reason,
        )
    dispatch.stage_enqueue([s.id for s in waiting])
    return waiting


def run_retry_plan(run: Run) -> tuple[list[str], list[str]]:
    """(reused, rerun): the stage names a retry of the run's failed stage reuses and runs."""
    names = workflow_get(run.workflow).stage_names
    failed = run_failed_stage(run)
    if failed is None:
        raise OperationRefused(f"nothing to retry: run {run.pk} is {run.status}")
    return names[: failed.position], names[failed.position :]


def run_rerun_plan(run: Run, stage_name: str) -> tuple[list[str], list[str]]:
    """(reused, rerun): the stage names a re-run from `stage_name` reuses and runs anew."""
    names = workflow_get(run.workflow).stage_names
    if stage_name not in names:
        raise OperationRefused(
            f"“{stage_name}” is not a stage of this workflow; choose one of {', '.join(names)}."
        )
    if run.status in (RunStatus.QUEUED, RunStatus.RUNNING):
        raise OperationRefused(
            f"Run {run.pk} is still {run.status}; cancel it or wait for it before re-running."
        )
    at = names.index(stage_name)
    succeeded = run_succeeded_stage_names(run)
    missing = [name for name in names[:at] if name not in succeeded]
    if missing:
        raise OperationRefused(
            f"Cannot re-run run {run.pk} from {stage_name}: {missing[0]} has no output to reuse; "
            f"re-run from {missing[0]} or earlier."
        )
    return names[:at], names[at:]


def run_rerun_from(
    *,
    run: Run,
    stage_name: str,
    operator: Operator,
    reason: str,
    inline: bool = False,
    start: bool = True,
    input_changes: dict[str, Any] | None = None,
    label: str = "",
) -> Run:
    """A new run forked from `run`: outputs before `stage_name` reused by reference, the rest
    run anew. The old run and its outputs stay as they are. With start=False the caller starts
    the new run (after pointing its subject at it, say). `input_changes` are merged into the
    fork's input (another model, say); `label` names the batch it belongs to."""
    reason = _reason(reason)
    run_rerun_plan(run, stage_name)
    with transaction.atomic():
        fork = store.run_create(
            workflow=workflow_get(run.workflow),
            subject=run.subject,
            input={**run.input, **(input_changes or {})},
            forked_from=run,
            fork_stage=stage_name,
            label=label,
        )
        store.audit_record(
            action=OperatorAction.RERUN,
            operator=operator,
            run=run,
            new_run=fork,
            stage=stage_name,
            reason=reason,
        )
    if start:
        run_start(fork, inline=inline)
    return fork


def run_cancel(*, run: Run, operator: Operator, reason: str) -> None:
    reason = _reason(reason)
    with transaction.atomic():
        if not store.run_mark_cancelled(run=run, reason=f"cancelled by {operator.label}: {reason}"):
            raise OperationRefused(f"Run {run.pk} is already {run.status}; nothing to cancel.")
        store.audit_record(action=OperatorAction.CANCEL, operator=operator, run=run, reason=reason)
        dispatch.run_cancelled(run.pk)
