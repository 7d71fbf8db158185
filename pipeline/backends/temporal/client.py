"""The Temporal backend (`PIPELINE_BACKEND=temporal`): Temporal schedules, the engine decides.

The database stays the record of every run, stage, attempt, checkpoint and model answer, and
the same stage functions run: Temporal replaces only django-q2 and the sweep's retry timer.

- Whatever would send a stage to django-q2 (a start, the next stage, an operator's retry, a
  re-run, the sweep) starts instead the one workflow of the run, `pipeline-run`
  (`pipeline.backends.temporal.workflow`), unless it is already running (workflow id `run-<id>`).
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
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from django.conf import settings
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError

from pipeline.backends.temporal.workflow import (
    WAKE_SIGNAL,
    WORKFLOW_NAME,
    StageUnitsWorkflow,
    UnitsPlan,
)
from pipeline.core import store
from pipeline.core.dispatch import RunLink

if TYPE_CHECKING:
    from pipeline.core.models import Stage

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
    spec = claim.spec
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


class TemporalBackend:
    """`PIPELINE_BACKEND=temporal`: what would be a django-q2 message starts or wakes the run's
    workflow; units are lent workers by a small workflow of their own."""

    def stages_send(self, stages: Sequence[Stage]) -> None:
        runs_drive([stage.run_id for stage in stages])

    def units_send(self, claim: store.Claim, *, count: int, timeout_seconds: int) -> None:
        units_helpers_start(claim, count=count, timeout_seconds=timeout_seconds)

    def run_cancelled(self, run_id: int) -> None:
        run_workflow_cancel(run_id)

    def run_link(self, run_id: int) -> RunLink | None:
        return RunLink(label=workflow_id(run_id), url=workflow_url(run_id))
