"""The engine's tables. `pipeline.core.store` writes them; `pipeline.core.selectors` is how
others read."""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q

from pipeline.core.states import AttemptStatus, FailureKind, RunStatus, StageStatus, UnitStatus


def _status_check(name: str, choices: type[models.TextChoices]) -> models.CheckConstraint:
    return models.CheckConstraint(condition=Q(status__in=choices.values), name=name)


class Run(models.Model):
    """One execution of a workflow for a subject (an opaque key the domain chooses)."""

    workflow = models.CharField(max_length=64)
    subject = models.CharField(max_length=128)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    input = models.JSONField(default=dict)
    forked_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="forks"
    )
    fork_stage = models.CharField(max_length=64, blank=True)
    # A name an operator gives a batch of runs (a model or prompt migration, say), to compare
    # them with the runs they were forked from. Not inherited by later forks.
    label = models.CharField(max_length=64, blank=True, db_index=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        # Stage outputs, model answers, checkpoints, error messages and tracebacks hold what
        # the domain gave the engine (a transcript, a note): the admin shows them only with it.
        permissions = [
            ("view_phi", "Can read stage outputs, model answers, checkpoints and tracebacks")
        ]
        constraints = [_status_check("pipeline_run_status_valid", RunStatus)]
        indexes = [
            models.Index(fields=["subject", "-created_at"], name="pipeline_run_subject_idx"),
            models.Index(fields=["status", "-created_at"], name="pipeline_run_status_idx"),
        ]

    def __str__(self) -> str:
        return f"run {self.pk} of {self.workflow} ({self.status})"


class Stage(models.Model):
    """One stage of one run: its status, lease, retry schedule and committed output."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="stages")
    name = models.CharField(max_length=64)
    position = models.PositiveSmallIntegerField()
    status = models.CharField(
        max_length=16, choices=StageStatus.choices, default=StageStatus.PENDING
    )
    attempt_count = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    lease_owner = models.CharField(max_length=128, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    output = models.JSONField(null=True, blank=True)
    # A forked run reuses the outputs of the stages before its fork point by reference.
    reused_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="reused_by"
    )
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    # How far the running attempt has got, in units the stage chooses (chunks, say); what a
    # page shows as a progress bar. Reset when an attempt starts.
    progress_done = models.PositiveIntegerField(default=0)
    progress_total = models.PositiveIntegerField(null=True, blank=True)
    # For a stage whose units keep arriving while it runs (`units_stream`): when its producer
    # said no more will come. Until then the stage cannot finish.
    input_sealed_at = models.DateTimeField(null=True, blank=True)
    # How many items of the committed output a person must review (`StageSpec.flagged`).
    flagged = models.PositiveIntegerField(default=0)
    # Set exactly when the stage is failed: a permanent error, or attempts exhausted.
    failure_kind = models.CharField(max_length=16, choices=FailureKind.choices, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["run_id", "position"]
        constraints = [
            _status_check("pipeline_stage_status_valid", StageStatus),
            models.UniqueConstraint(fields=["run", "name"], name="pipeline_stage_unique_name"),
            models.UniqueConstraint(
                fields=["run", "position"], name="pipeline_stage_unique_position"
            ),
            models.CheckConstraint(
                condition=~Q(status=StageStatus.RUNNING) | Q(lease_expires_at__isnull=False),
                name="pipeline_stage_running_has_lease",
            ),
            models.CheckConstraint(
                condition=(Q(status=StageStatus.FAILED) & Q(failure_kind__in=FailureKind.values))
                | (~Q(status=StageStatus.FAILED) & Q(failure_kind="")),
                name="pipeline_stage_failed_has_kind",
            ),
        ]
        indexes = [
            models.Index(fields=["status", "next_attempt_at"], name="pipeline_stage_due_idx"),
            models.Index(fields=["status", "lease_expires_at"], name="pipeline_stage_lease_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.name} of run {self.run_id} ({self.status})"


class Attempt(models.Model):
    """One try at a stage. Kept for every try, not only the last one."""

    stage = models.ForeignKey(Stage, on_delete=models.CASCADE, related_name="attempts")
    number = models.PositiveIntegerField()
    status = models.CharField(
        max_length=16, choices=AttemptStatus.choices, default=AttemptStatus.RUNNING
    )
    worker = models.CharField(max_length=128, blank=True)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    traceback = models.TextField(blank=True)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal("0"))
    audio_seconds = models.FloatField(default=0.0)
    compute_seconds = models.FloatField(default=0.0)
    # "Saved by resume": what this attempt did not have to spend because earlier work was
    # reused (outputs of earlier stages, memoized LLM answers, transcribed chunks). Recorded
    # only where a run from scratch would have paid again: retries and forked runs.
    saved_input_tokens = models.PositiveIntegerField(default=0)
    saved_output_tokens = models.PositiveIntegerField(default=0)
    saved_cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal("0"))
    saved_audio_seconds = models.FloatField(default=0.0)

    class Meta:
        ordering = ["stage_id", "number"]
        constraints = [
            _status_check("pipeline_attempt_status_valid", AttemptStatus),
            models.UniqueConstraint(
                fields=["stage", "number"], name="pipeline_attempt_unique_number"
            ),
        ]

    def __str__(self) -> str:
        return f"attempt {self.number} of {self.stage}"


class Checkpoint(models.Model):
    """A finished piece of a stage (a transcribed chunk, say) that a retry will not redo."""

    stage = models.ForeignKey(Stage, on_delete=models.CASCADE, related_name="checkpoints")
    key = models.CharField(max_length=200)
    value = models.JSONField()
    attempt_number = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["stage", "key"], name="pipeline_checkpoint_unique_key")
        ]

    def __str__(self) -> str:
        return f"checkpoint {self.key} of stage {self.stage_id}"


class Unit(models.Model):
    """One of the parallel pieces of a stage that fans out (a chunk of audio, say).

    The stage's attempt plans its units; any free worker on the stage's queue, the attempt's
    own included, takes one under a lease of its own, and a finished unit's result is kept as
    the stage's checkpoint under the unit's key. Units belong to one attempt of their stage: a
    later attempt plans the unfinished ones again and fences out workers of the earlier one."""

    stage = models.ForeignKey(Stage, on_delete=models.CASCADE, related_name="units")
    key = models.CharField(max_length=200)
    index = models.PositiveIntegerField()
    input = models.JSONField()
    attempt_number = models.PositiveIntegerField()  # of the stage attempt that planned it
    status = models.CharField(max_length=16, choices=UnitStatus.choices, default=UnitStatus.READY)
    worker = models.CharField(max_length=128, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    tries = models.PositiveIntegerField(default=0)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    seconds = models.FloatField(default=0.0)  # the last try's compute time
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    retryable = models.BooleanField(default=True)

    class Meta:
        ordering = ["stage_id", "index"]
        constraints = [
            _status_check("pipeline_unit_status_valid", UnitStatus),
            models.UniqueConstraint(fields=["stage", "key"], name="pipeline_unit_unique_key"),
        ]
        indexes = [models.Index(fields=["stage", "status"], name="pipeline_unit_status_idx")]

    def __str__(self) -> str:
        return f"unit {self.index} of stage {self.stage_id} ({self.status})"


class LLMCall(models.Model):
    """One answered model request: the token ledger, and the memo that stops paying twice.

    Every answer the provider billed is a row. The first answer to a request in a stage is the
    memo, unique by (stage, request digest): a retry of the stage finds it here instead of
    sending the request again. Two attempts that asked at once (a stalled one and the one that
    replaced it) were both billed: the later answer is kept as a duplicate of the memo, for its
    cost, and both attempts go on with the memo's answer."""

    stage = models.ForeignKey(Stage, on_delete=models.CASCADE, related_name="llm_calls")
    attempt = models.ForeignKey(Attempt, on_delete=models.CASCADE, related_name="llm_calls")
    duplicate_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="duplicates"
    )
    digest = models.CharField(max_length=64)
    model = models.CharField(max_length=128)
    content = models.TextField()
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal("0"))
    duration_ms = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["stage", "digest"],
                condition=Q(duplicate_of__isnull=True),
                name="pipeline_llmcall_unique_digest",
            ),
            # An attempt sends a request at most once, so a second row of its own for one is a
            # retried insert whose first try committed unseen, not a second bill.
            models.UniqueConstraint(
                fields=["attempt", "digest"], name="pipeline_llmcall_unique_attempt_digest"
            ),
        ]
        indexes = [models.Index(fields=["created_at"], name="pipeline_llmcall_created_idx")]

    def __str__(self) -> str:
        return f"{self.model} call {self.digest[:12]}"


class OperatorAction(models.TextChoices):
    RETRY = "retry", "Retry failed stage"
    RUN_NOW = "run_now", "Run now"
    RERUN = "rerun", "Re-run from stage"
    CANCEL = "cancel", "Cancel"


class AuditEntry(models.Model):
    """Who did what to which run, when and why. Written once by the services, never edited."""

    action = models.CharField(max_length=16, choices=OperatorAction.choices)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    # Operators on the command line have no user row; their OS login is kept instead.
    actor_label = models.CharField(max_length=150)
    run = models.ForeignKey(Run, on_delete=models.PROTECT, related_name="audit_entries")
    new_run = models.ForeignKey(
        Run, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    stage = models.CharField(max_length=64, blank=True)
    reason = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "audit entries"
        constraints = [
            models.CheckConstraint(
                condition=Q(action__in=OperatorAction.values), name="pipeline_audit_action_valid"
            ),
            models.CheckConstraint(condition=~Q(reason=""), name="pipeline_audit_reason_given"),
        ]
        indexes = [models.Index(fields=["run", "-created_at"], name="pipeline_audit_run_idx")]

    def __str__(self) -> str:
        return f"{self.get_action_display()} on run {self.run_id} by {self.actor_label}"
