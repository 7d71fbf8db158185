"""The states a run, a stage and an attempt can be in, and how a stage can end badly.

Kept apart from the models so that the domain can name a state (`RunStatus.FAILED`) without
reaching into the engine's tables."""

from __future__ import annotations

from django.db.models import TextChoices


class RunStatus(TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


class StageStatus(TextChoices):
    PENDING = "pending", "Pending"  # waiting for the stages before it
    READY = "ready", "Ready"  # may be claimed from next_attempt_at on (a retry waits here)
    RUNNING = "running", "Running"  # claimed: a worker holds the lease
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"  # see FailureKind for why
    CANCELLED = "cancelled", "Cancelled"


class FailureKind(TextChoices):
    """Why a stage is `failed`: retrying could not help, or its policy ran out of attempts."""

    PERMANENT = "permanent", "Failed permanently"
    EXHAUSTED = "exhausted", "Gave up after its last attempt"


class AttemptStatus(TextChoices):
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    LOST = "lost", "Lost (lease expired)"  # the worker died or stopped heartbeating
    CANCELLED = "cancelled", "Cancelled"


class UnitStatus(TextChoices):
    READY = "ready", "Ready"  # planned, or given back (its worker lost it)
    RUNNING = "running", "Running"  # a worker holds its lease
    DONE = "done", "Done"  # its result is a checkpoint of the stage
    FAILED = "failed", "Failed"  # its error fails the stage's attempt, by the stage's policy


FINAL_RUN_STATUSES = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})
