"""Hands ready stages to the scheduler chosen by `PIPELINE_BACKEND`: django-q2 (`builtin`) or
Temporal (`temporal`). A message is only a wake-up call naming a stage; the database says
whether there is anything to do when it arrives.

The scheduler is one `Backend` object, chosen here once from settings; nothing else in the
engine asks which one runs. The core names the backends by their dotted paths and imports
neither: they build on the core, not the other way round."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple, Protocol

from django.conf import settings
from django.db import transaction
from django.utils.module_loading import import_string

from pipeline.core import store
from pipeline.core.workflow import Workflow, workflow_get

if TYPE_CHECKING:
    from pipeline.core.models import Stage

# PIPELINE_BACKEND's values, and the class that schedules for each.
BACKENDS = {
    "builtin": "pipeline.backends.djangoq.DjangoQBackend",
    "temporal": "pipeline.backends.temporal.client.TemporalBackend",
}


class RunLink(NamedTuple):
    """Where a scheduler shows a run: its own id for it, and a URL of its UI (or "")."""

    label: str
    url: str


class Backend(Protocol):
    """What the engine asks of a scheduler. Each call comes after the transaction that made
    the work ready has committed, so a scheduler never wakes a worker for rows it cannot see."""

    def stages_send(self, stages: Sequence[Stage]) -> None:
        """Wake a worker for each stage (marked enqueued), on the stage's queue."""

    def units_send(self, claim: store.Claim, *, count: int, timeout_seconds: int) -> None:
        """Wake `count` more workers of the stage's queue to take its units."""

    def run_cancelled(self, run_id: int) -> None:
        """The database has cancelled the run: stop whatever the scheduler holds for it."""

    def run_link(self, run_id: int) -> RunLink | None:
        """Where the scheduler's own UI shows the run, if it has one."""


@lru_cache(maxsize=len(BACKENDS))
def _backend_named(name: str) -> Backend:
    backend: Backend = import_string(BACKENDS[name])()
    return backend


def backend() -> Backend:
    """The scheduler of `PIPELINE_BACKEND` (system check pipeline.E007 refuses another
    value; its SDK is imported only when chosen)."""
    return _backend_named(settings.PIPELINE_BACKEND)


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
    if stages:
        scheduler = backend()
        transaction.on_commit(lambda: scheduler.stages_send(stages))


def units_enqueue(claim: store.Claim, *, count: int) -> None:
    """Wake `count` more workers of the stage's queue to take its units (`pipeline.core.units`)."""
    count = min(count, int(settings.PIPELINE_UNIT_HELPERS_MAX))
    if count <= 0:
        return
    timeout = task_timeout_seconds(workflow_get(claim.workflow), claim.stage_name)
    scheduler = backend()
    transaction.on_commit(lambda: scheduler.units_send(claim, count=count, timeout_seconds=timeout))


def run_cancelled(run_id: int) -> None:
    """Tell the scheduler, once the cancellation commits."""
    scheduler = backend()
    transaction.on_commit(lambda: scheduler.run_cancelled(run_id))
