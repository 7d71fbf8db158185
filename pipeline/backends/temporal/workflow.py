"""The one Temporal workflow: it drives a run of any declared workflow, stage by stage.

Deterministic by construction: it only asks activities what to run next and runs it. Which
stage is next, what its retry policy is and whether it succeeded are the engine's database's
answers (`pipeline.backends.temporal.activities`), so this module imports nothing but the
SDK: Temporal replays it in a sandbox, and Django must not be imported there.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

WORKFLOW_NAME = "pipeline-run"
WAKE_SIGNAL = "wake"
NEXT_STAGE_ACTIVITY = "pipeline-next-stage"
STAGE_ACTIVITY = "pipeline-stage-attempt"
UNITS_WORKFLOW_NAME = "pipeline-stage-units"
UNITS_ACTIVITY = "pipeline-units-work"


@dataclass
class StagePlan:
    """What the workflow needs to schedule a stage's attempts: its declaration, translated."""

    name: str
    task_queue: str
    start_to_close_seconds: float
    heartbeat_seconds: float
    initial_interval_seconds: float
    backoff_coefficient: float
    maximum_interval_seconds: float
    maximum_attempts: int
    non_retryable_error_types: list[str] = field(default_factory=list)


@dataclass
class NextStage:
    """The run's next stage to run; None when the run is final or waits for an operator."""

    stage: StagePlan | None = None


@dataclass
class UnitsPlan:
    stage_id: int
    task_queue: str
    count: int
    start_to_close_seconds: float


@workflow.defn(name=WORKFLOW_NAME)
class PipelineRunWorkflow:
    """Run the next ready stage of a run until none is left (the run is final, or waits for an
    operator). An operator's retry or the sweep starts this workflow again for the run."""

    def __init__(self) -> None:
        self._wakes = 0

    @workflow.signal(name=WAKE_SIGNAL)
    def wake(self) -> None:
        """Something made a stage ready (a retry, the sweep): look again before finishing. Sent
        with the start, so a wake-up that finds the workflow about to finish is never lost:
        Temporal refuses to complete a workflow that has a signal it has not yet seen."""
        self._wakes += 1

    @workflow.run
    async def run(self, run_id: int, control_queue: str) -> str:
        wakes_seen = self._wakes
        following = await self._next_stage(run_id, control_queue)
        while True:
            plan = following.stage
            if plan is None:
                if self._wakes == wakes_seen:
                    return "idle"
                wakes_seen = self._wakes
                following = await self._next_stage(run_id, control_queue)
                continue
            wakes_seen = self._wakes
            # The stage's activity answers with the stage to run after it: one activity and
            # one workflow task per stage, not two.
            following = await workflow.execute_activity(
                STAGE_ACTIVITY,
                args=[run_id, plan.name],
                task_queue=plan.task_queue,
                result_type=NextStage,
                start_to_close_timeout=timedelta(seconds=plan.start_to_close_seconds),
                heartbeat_timeout=timedelta(seconds=plan.heartbeat_seconds),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=plan.initial_interval_seconds),
                    backoff_coefficient=plan.backoff_coefficient,
                    maximum_interval=timedelta(seconds=plan.maximum_interval_seconds),
                    maximum_attempts=plan.maximum_attempts,
                    non_retryable_error_types=plan.non_retryable_error_types,
                ),
            )

    async def _next_stage(self, run_id: int, control_queue: str) -> NextStage:
        result: NextStage = await workflow.execute_activity(
            NEXT_STAGE_ACTIVITY,
            run_id,
            task_queue=control_queue,
            result_type=NextStage,
            start_to_close_timeout=timedelta(seconds=30),
        )
        return result


@workflow.defn(name=UNITS_WORKFLOW_NAME)
class StageUnitsWorkflow:
    """Wake `count` workers of a stage's task queue to take its units (`pipeline.core.units`)."""

    @workflow.run
    async def run(self, plan: UnitsPlan) -> None:
        # Not retried, and no heartbeat: a unit has its own lease in the database, and the
        # attempt takes back any unit whose worker is lost. These only lend it workers.
        helpers = [
            workflow.start_activity(
                UNITS_ACTIVITY,
                plan.stage_id,
                task_queue=plan.task_queue,
                start_to_close_timeout=timedelta(seconds=plan.start_to_close_seconds),
                retry_policy=RetryPolicy(maximum_attempts=1),
            )
            for _ in range(plan.count)
        ]
        await asyncio.gather(*helpers, return_exceptions=True)
