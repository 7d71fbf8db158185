"""Hands stages to django-q2 (or, with `PIPELINE_BACKEND=temporal`, to Temporal). A queue
message is only a wake-up call naming a stage; the database says whether there is anything to
do when it arrives."""

from __future__ import annotations

from django.conf import settings
from django.db import transaction
from django_q.tasks import async_task

from pipeline import store
from pipeline.workflow import Workflow, workflow_get

TASK_STAGE_EXECUTE = "pipeline.tasks.stage_execute"
TASK_UNITS_WORK = "pipeline.tasks.units_work"


def temporal_backend() -> bool:
    """Whether Temporal schedules the stages (`pipeline.temporal`, whose SDK is imported only
    then) rather than django-q2."""
    return settings.PIPELINE_BACKEND == "temporal"


def task_timeout_seconds(workflow: Workflow, stage_name: str) -> int:
    """How long one queue message may keep a worker: the stage and every stage after it that
    the worker runs inline (same queue), each with all its attempts and short backoffs."""
    names = workflow.stage_names
    first = workflow.stage(stage_name)
    total = 0.0
    for spec in workflow.stages[names.index(stage_name) :]:
        if spec.queue != first.queue:
            break
        total += spec.policy.worst_case_seconds(
            inline_wait_seconds=float(settings.PIPELINE_INLINE_RETRY_MAX_SECONDS)
        )
    return int(total) + 60


def stage_enqueue(stage_ids: list[int]) -> None:
    """Send a wake-up message per stage once the current transaction commits."""
    stages = store.stages_mark_enqueued(stage_ids)
    if not stages:
        return
    if temporal_backend():
        from pipeline import temporal

        run_ids = [stage.run_id for stage in stages]
        transaction.on_commit(lambda: temporal.runs_drive(run_ids))
        return

    def send() -> None:
        for stage in stages:
            workflow = workflow_get(stage.run.workflow)
            spec = workflow.stage(stage.name)
            options: dict[str, object] = {
                "task_name": f"run-{stage.run_id}-{stage.name}-{stage.attempt_count + 1}",
                "timeout": task_timeout_seconds(workflow, stage.name),
                # Name the queue even for the default one: a worker on another queue (say,
                # transcription hosts) must send the next stage home, not to its own queue.
                "cluster": spec.queue or settings.Q_CLUSTER["name"],
            }
            async_task(TASK_STAGE_EXECUTE, stage.id, q_options=options)

    transaction.on_commit(send)


def units_enqueue(claim: store.Claim, *, count: int) -> None:
    """Wake `count` more workers of the stage's queue to take its units (`pipeline.units`)."""
    count = min(count, int(settings.PIPELINE_UNIT_HELPERS_MAX))
    if count <= 0:
        return
    workflow = workflow_get(claim.workflow)
    spec = workflow.stage(claim.stage_name)
    timeout = task_timeout_seconds(workflow, claim.stage_name)
    if temporal_backend():
        from pipeline import temporal

        transaction.on_commit(
            lambda: temporal.units_helpers_start(claim, count=count, timeout_seconds=timeout)
        )
        return
    options: dict[str, object] = {
        "timeout": timeout,
        "cluster": spec.queue or settings.Q_CLUSTER["name"],
    }

    def send() -> None:
        for helper in range(count):
            name = f"run-{claim.run_id}-{claim.stage_name}-{claim.attempt_number}-units-{helper}"
            async_task(TASK_UNITS_WORK, claim.stage_id, q_options=options | {"task_name": name})

    transaction.on_commit(send)
