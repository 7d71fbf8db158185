"""The activities of the Temporal backend: each claims and runs through the engine's own
attempt path (`executor.attempt_execute`), exactly as a django-q2 worker does, so attempts,
checkpoints, the LLM memo and the ledger are recorded the same way."""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from django.conf import settings
from django.db import close_old_connections
from temporalio import activity
from temporalio.exceptions import ApplicationError

from pipeline.backends.temporal.client import task_queue
from pipeline.backends.temporal.workflow import (
    NEXT_STAGE_ACTIVITY,
    STAGE_ACTIVITY,
    UNITS_ACTIVITY,
    NextStage,
    StagePlan,
)
from pipeline.core import executor, recovery, store, units
from pipeline.core.models import Stage
from pipeline.core.states import StageStatus
from pipeline.core.workflow import interval_scale, stage_spec

T = TypeVar("T")


def stage_plan(stage: Stage) -> StagePlan:
    """A stage's declaration in Temporal's terms: its queue, timeout, heartbeat and retries."""
    spec = stage_spec(stage.run.workflow, stage.name)
    policy = spec.policy
    scale = interval_scale()
    return StagePlan(
        name=stage.name,
        task_queue=task_queue(spec.queue),
        start_to_close_seconds=policy.start_to_close_timeout_seconds,
        heartbeat_seconds=float(settings.PIPELINE_LEASE_SECONDS),
        initial_interval_seconds=max(0.001, policy.initial_interval_seconds * scale),
        backoff_coefficient=policy.backoff_coefficient,
        maximum_interval_seconds=max(0.001, policy.maximum_interval_seconds * scale),
        # The engine decides when to give up (a final failure ends the activity normally);
        # one more than its limit lets an attempt lost to a killed worker be counted too.
        maximum_attempts=policy.maximum_attempts + 1,
        non_retryable_error_types=list(policy.non_retryable_error_codes),
    )


def _fresh_connection(function: Callable[..., T]) -> Callable[..., T]:
    """Activities run on a pool's threads, which Django's request cycle never tidies."""

    def wrapper(*args: Any) -> T:
        close_old_connections()
        try:
            return function(*args)
        finally:
            close_old_connections()

    wrapper.__name__ = function.__name__
    return wrapper


@activity.defn(name=NEXT_STAGE_ACTIVITY)
@_fresh_connection
def next_stage(run_id: int) -> NextStage:
    return _next_stage(run_id)


def _next_stage(run_id: int) -> NextStage:
    """The run's stage to run next: a ready one, or one whose worker is lost (its lease will
    be taken back by the attempt). None when the run is final or waits for an operator."""
    stage = (
        Stage.objects.filter(run_id=run_id, status__in=[StageStatus.READY, StageStatus.RUNNING])
        .select_related("run")
        .order_by("position")
        .first()
    )
    return NextStage(stage=stage_plan(stage) if stage is not None else None)


@activity.defn(name=STAGE_ACTIVITY)
@_fresh_connection
def stage_attempt(run_id: int, stage_name: str) -> NextStage:
    """One attempt at a stage, as a django-q2 worker makes it; then the stage to run next."""
    worker = f"{executor.worker_name()}:temporal-{activity.info().attempt}"
    stage = Stage.objects.get(run_id=run_id, name=stage_name)
    beat = _temporal_heartbeat()
    claim = _stage_claim(stage.id, worker=worker, beat=beat)
    if claim is None:
        return _next_stage(run_id)
    outcome = executor.attempt_execute(claim, beat=beat)
    if outcome.decision is not None and outcome.decision.retry:
        raise ApplicationError(
            outcome.decision.message,
            type=outcome.failure.code if outcome.failure else None,
            next_retry_delay=timedelta(seconds=max(0.001, outcome.decision.retry_in_seconds or 0)),
        )
    return _next_stage(run_id)


@activity.defn(name=UNITS_ACTIVITY)
@_fresh_connection
def units_work(stage_id: int) -> int:
    return units.units_work(stage_id, worker=f"{executor.worker_name()}:temporal")


def _temporal_heartbeat() -> Callable[[], None]:
    """Heartbeat the activity from the lease keeper's thread: the activity's context is a
    context variable of this thread, so the keeper enters a copy of it."""
    context = contextvars.copy_context()
    return lambda: context.run(activity.heartbeat)


def _stage_claim(stage_id: int, *, worker: str, beat: Callable[[], None]) -> store.Claim | None:
    """Claim the stage now, whatever its backoff said (Temporal has waited it out); if a lost
    worker still holds it, wait for its lease to expire and take it back first."""
    while True:
        claim = store.stage_claim(stage_id=stage_id, worker=worker, due_only=False)
        if claim is not None:
            return claim
        stage = Stage.objects.get(id=stage_id)
        if stage.status != StageStatus.RUNNING:
            return None
        recovery.leases_reap()
        beat()
        time.sleep(min(1.0, float(settings.PIPELINE_LEASE_SECONDS) / 3))
