"""django-q2 as transport only: the entry points its workers call (one line each, the engine
does the work), the backend that sends them, and the schedule of the recovery sweep.

The entry points' dotted paths are what a queued message and the sweep's schedule row name.
Moving one strands the messages in flight across a deploy (the sweep sends their stages
again) and `migrate` rewrites the schedule row."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django_q.tasks import async_task

from pipeline.core import executor, recovery, store, units
from pipeline.core.dispatch import RunLink, task_timeout_seconds
from pipeline.core.workflow import workflow_get

if TYPE_CHECKING:
    from pipeline.core.models import Stage

TASK_STAGE_EXECUTE = "pipeline.backends.djangoq.stage_execute"
TASK_UNITS_WORK = "pipeline.backends.djangoq.units_work"
TASK_SWEEP = "pipeline.backends.djangoq.sweep"
SWEEP_SCHEDULE_NAME = "pipeline recovery sweep"


# --- what django-q2's workers run ------------------------------------------------------------


def stage_execute(stage_id: int) -> None:
    executor.stage_execute(stage_id)


def units_work(stage_id: int) -> None:
    units.units_work(stage_id, worker=executor.worker_name())


def sweep() -> None:
    recovery.sweep()


# --- the backend -------------------------------------------------------------------------------


class DjangoQBackend:
    """`PIPELINE_BACKEND=builtin`: a django-q2 message per stage, the sweep for lost ones."""

    def stages_send(self, stages: Sequence[Stage]) -> None:
        for stage in stages:
            workflow = workflow_get(stage.run.workflow)
            options: dict[str, object] = {
                "task_name": f"run-{stage.run_id}-{stage.name}-{stage.attempt_count + 1}",
                "timeout": task_timeout_seconds(workflow, stage.name),
                # Name the queue even for the default one: a worker on another queue (say,
                # transcription hosts) must send the next stage home, not to its own queue.
                "cluster": workflow.stage(stage.name).queue or settings.Q_CLUSTER["name"],
            }
            async_task(TASK_STAGE_EXECUTE, stage.id, q_options=options)

    def units_send(self, claim: store.Claim, *, count: int, timeout_seconds: int) -> None:
        spec = claim.spec
        options: dict[str, object] = {
            "timeout": timeout_seconds,
            "cluster": spec.queue or settings.Q_CLUSTER["name"],
        }
        for helper in range(count):
            name = f"run-{claim.run_id}-{claim.stage_name}-{claim.attempt_number}-units-{helper}"
            async_task(TASK_UNITS_WORK, claim.stage_id, q_options=options | {"task_name": name})

    def run_cancelled(self, run_id: int) -> None:
        """Nothing to stop: a worker still on the run is fenced out at its next heartbeat."""

    def run_link(self, run_id: int) -> RunLink | None:
        return None


# --- the sweep's schedule ----------------------------------------------------------------------


def sweep_schedule_ensure(**kwargs: Any) -> None:
    """Create or update the sweep schedule (connected to post_migrate, so it always exists).

    django-q2's scheduler counts in whole minutes and wakes about every 30 seconds; for a
    tighter bound run `manage.py pipeline_sweep --every SECONDS` beside the cluster."""
    from django_q.models import Schedule

    minutes = max(1, math.ceil(settings.PIPELINE_SWEEP_SECONDS / 60))
    Schedule.objects.update_or_create(
        name=SWEEP_SCHEDULE_NAME,
        defaults={
            "func": TASK_SWEEP,
            "schedule_type": Schedule.MINUTES,
            "minutes": minutes,
            "repeats": -1,
        },
    )
