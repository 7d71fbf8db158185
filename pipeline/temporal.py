"""The Temporal backend (`PIPELINE_BACKEND=temporal`): Temporal schedules, the engine decides.

The database stays the record of every run, stage, attempt, checkpoint and model answer, and
the same stage functions run: Temporal replaces only django-q2 and the sweep's retry timer.

- Whatever would send a stage to django-q2 (a start, the next stage, an operator's retry, a
  re-run, the sweep) starts instead the one workflow of the run, `pipeline-run`
  (`pipeline.temporal_workflow`), unless it is already running (workflow id `run-<id>`).
- The workflow asks the control queue for the run's next ready stage, with its policy turned
  into Temporal's terms, and runs it as an activity on that stage's task queue.
- The activity claims the stage and runs the attempt through `executor.attempt_execute`,
  exactly as a django-q2 worker would; it heartbeats to Temporal as it extends its lease. The
  engine's policy decides after a failure: a retry is an activity failure Temporal retries
  after the delay the policy chose (`next_retry_delay`); a final failure ends the activity
  normally and the workflow with it. An operator's retry then starts the workflow again,
  which finds the reopened stage and goes on from there: succeeded stages are never redone.
- A killed worker stops heartbeating; Temporal retries the activity elsewhere after the
  heartbeat timeout, and that attempt takes the stage back once its lease has expired.
- Cancelling a run cancels its workflow.

Django is not imported by the workflow module: Temporal replays workflows in a sandbox.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from django.conf import settings
from django.db import close_old_connections
from temporalio import activity
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.worker import Worker

from pipeline import executor, recovery, store, units
from pipeline.models import Stage
from pipeline.states import StageStatus
from pipeline.temporal_workflow import (
    NEXT_STAGE_ACTIVITY,
    STAGE_ACTIVITY,
    UNITS_ACTIVITY,
    WAKE_SIGNAL,
    WORKFLOW_NAME,
    NextStage,
    PipelineRunWorkflow,
    StagePlan,
    StageUnitsWorkflow,
    UnitsPlan,
)
from pipeline.workflow import workflow_get

logger = logging.getLogger(__name__)

T = TypeVar("T")


def control_queue() -> str:
    """The task queue of the workflows, and of the stages that name no queue."""
    return str(settings.TEMPORAL_TASK_QUEUE)


def task_queue(queue: str | None) -> str:
    """The Temporal task queue of an engine queue (a stage's `queue`)."""
    return f"{control_queue()}.{queue}" if queue else control_queue()


def workflow_id(run_id: int) -> str:
    return f"run-{run_id}"


def workflow_url(run_id: int) -> str:
    """Where the run's workflow is seen in Temporal's web UI; empty without TEMPORAL_UI_URL."""
    base = str(settings.TEMPORAL_UI_URL).rstrip("/")
    if not base:
        return ""
    return f"{base}/namespaces/{settings.TEMPORAL_NAMESPACE}/workflows/{workflow_id(run_id)}"


def _with_client(work: Callable[[Client], Awaitable[T]]) -> T:
    """Run `work` with a client, from synchronous Django code (a view, a command, an
    activity's thread): each call has its own event loop and connection."""

    async def connect_and_work() -> T:
        client = await Client.connect(
            settings.TEMPORAL_ADDRESS, namespace=settings.TEMPORAL_NAMESPACE
        )
        return await work(client)

    return asyncio.run(connect_and_work())


# --- what the engine calls instead of django-q2 ---------------------------------------------


def runs_drive(run_ids: Sequence[int]) -> None:
    """Make sure a workflow drives each run: start one, or wake the one running (signal with
    start: a stage made ready as the workflow finishes is still seen)."""

    async def start(client: Client) -> None:
        for run_id in dict.fromkeys(run_ids):
            await client.start_workflow(
                WORKFLOW_NAME,
                args=[run_id, control_queue()],
                id=workflow_id(run_id),
                task_queue=control_queue(),
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                start_signal=WAKE_SIGNAL,
            )

    try:
        _with_client(start)
    except (RuntimeError, OSError) as exc:  # RPCError is a RuntimeError: Temporal is down
        # As with a lost queue message: the stages stay ready in the database, and the sweep
        # sends them again once they have waited `requeue_after`.
        logger.warning("Temporal did not take runs %s (%s); the sweep will retry", run_ids, exc)


def run_workflow_cancel(run_id: int) -> None:
    """Cancel the run's workflow, if one is running (the database says the run is cancelled
    already; its attempt, if any, is fenced out at its next heartbeat)."""

    async def cancel(client: Client) -> None:
        try:
            await client.get_workflow_handle(workflow_id(run_id)).cancel()
        except RPCError as exc:  # not found, or already closed: nothing to cancel
            logger.info("workflow of run %s not cancelled: %s", run_id, exc.message)

    _with_client(cancel)


def units_helpers_start(claim: store.Claim, *, count: int, timeout_seconds: float) -> None:
    """Lend a fanned-out stage `count` more workers of its task queue."""
    spec = workflow_get(claim.workflow).stage(claim.stage_name)
    plan = UnitsPlan(
        stage_id=claim.stage_id,
        task_queue=task_queue(spec.queue),
        count=count,
        start_to_close_seconds=timeout_seconds,
    )

    async def start(client: Client) -> None:
        await client.start_workflow(
            StageUnitsWorkflow.run,
            plan,
            id=f"units-{claim.stage_id}-{claim.attempt_number}",
            task_queue=control_queue(),
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )

    _with_client(start)


# --- activities ------------------------------------------------------------------------------


def stage_plan(stage: Stage) -> StagePlan:
    """A stage's declaration in Temporal's terms: its queue, timeout, heartbeat and retries."""
    spec = workflow_get(stage.run.workflow).stage(stage.name)
    policy = spec.policy
    scale = float(settings.PIPELINE_RETRY_INTERVAL_SCALE)
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


# --- the worker ------------------------------------------------------------------------------


async def _client_when_up(wait_seconds: float) -> Client:
    """A client, once Temporal answers (a worker may start before its server)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return await Client.connect(
                settings.TEMPORAL_ADDRESS, namespace=settings.TEMPORAL_NAMESPACE
            )
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _workers_run(queues: Sequence[str], concurrency: int, wait_seconds: float) -> None:
    client = await _client_when_up(wait_seconds)
    # Each queue's worker may run `concurrency` activities: the pool has a thread for every
    # one of them, or an accepted activity would wait for a thread without heartbeating.
    slots = concurrency * len(queues)
    with concurrent.futures.ThreadPoolExecutor(max_workers=slots) as pool:
        workers = [
            Worker(
                client,
                task_queue=queue,
                workflows=[PipelineRunWorkflow, StageUnitsWorkflow]
                if queue == control_queue()
                else [],
                activities=[next_stage, stage_attempt, units_work],
                activity_executor=pool,
                max_concurrent_activities=concurrency,
            )
            for queue in queues
        ]
        await asyncio.gather(*(worker.run() for worker in workers))


def workers_run(queues: Sequence[str], *, concurrency: int, wait_seconds: float = 60) -> None:
    """Serve Temporal task queues until interrupted (`manage.py temporal_worker`), once the
    server answers (within `wait_seconds`)."""
    executor.attempts_per_process_set(concurrency * len(queues))
    asyncio.run(_workers_run(queues, concurrency, wait_seconds))
