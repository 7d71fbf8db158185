"""The engine on its own, with a domain-free workflow: claims, fences, retries, recovery."""

from __future__ import annotations

import time
from datetime import timedelta
from itertools import pairwise

import pytest
from django.utils import timezone
from pydantic import BaseModel

from pipeline.core import executor, recovery, store
from pipeline.core.errors import LeaseLost, PermanentError, TransientError
from pipeline.core.models import Attempt, AttemptStatus, Run, RunStatus, Stage, StageStatus
from pipeline.core.policy import RetryPolicy
from pipeline.core.states import FailureKind
from pipeline.core.workflow import StageRef, StageSpec, Workflow, workflow_register
from pipeline.ops import checks

pytestmark = pytest.mark.django_db

FAST = RetryPolicy(initial_interval_seconds=1, maximum_attempts=3, jitter=0)


class Value(BaseModel):
    value: int


class Attempted(BaseModel):
    attempt: int


class Nothing(BaseModel):
    pass


def first(ctx):
    return Value(value=1)


def second(ctx):
    return Value(value=ctx.output(StageRef("first", Value)).value + 1)


def flaky(ctx):
    if ctx.attempt_number < 3:
        raise TransientError("the service hiccuped", code="hiccup")
    return Attempted(attempt=ctx.attempt_number)


def refused(ctx):
    raise PermanentError("the input is wrong; fix it", code="bad_input")


def buggy(ctx):
    raise ZeroDivisionError("a bug")


def slow(ctx):
    time.sleep(2.5)
    return Nothing()


class Unfixable(Exception):
    pass


def unfixable(ctx):
    raise Unfixable("declared non-retryable by the stage")


def flow(name: str, *middle: StageSpec) -> Workflow:
    workflow = Workflow(
        name=name,
        stages=(
            StageSpec("first", first, FAST, output=Value),
            *middle,
            StageSpec("last", second if not middle else first, FAST, output=Value),
        ),
    )
    workflow_register(workflow)
    return workflow


def statuses(run: Run) -> list[tuple[str, str, int]]:
    return [(s.name, s.status, s.attempt_count) for s in run.stages.order_by("position")]


def test_a_new_run_has_its_first_stage_ready_and_the_rest_pending():
    run = store.run_create(workflow=flow("t-new"), subject="thing:1", input={})
    assert statuses(run) == [("first", "ready", 0), ("last", "pending", 0)]
    assert run.status == RunStatus.QUEUED


def test_a_stage_is_claimed_once_even_when_delivered_twice():
    run = store.run_create(workflow=flow("t-claim"), subject="thing:1", input={})
    stage = run.stages.get(name="first")
    claim = store.stage_claim(stage_id=stage.id, worker="w1")
    assert claim is not None and claim.attempt_number == 1
    assert store.stage_claim(stage_id=stage.id, worker="w2") is None
    assert Attempt.objects.filter(stage=stage).count() == 1
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING


def test_claim_costs_a_bounded_number_of_queries(django_assert_max_num_queries):
    run = store.run_create(workflow=flow("t-queries"), subject="thing:1", input={})
    stage = run.stages.get(name="first")
    with django_assert_max_num_queries(7):
        assert store.stage_claim(stage_id=stage.id, worker="w1") is not None


def test_a_zombie_cannot_overwrite_the_attempt_that_replaced_it():
    run = store.run_create(workflow=flow("t-zombie"), subject="thing:1", input={})
    stage = run.stages.get(name="first")
    zombie = store.stage_claim(stage_id=stage.id, worker="zombie")
    Stage.objects.filter(id=stage.id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))

    assert [lost.stage_id for lost in recovery.leases_reap()] == [stage.id]
    with pytest.raises(LeaseLost):
        store.stage_heartbeat(zombie)
    fresh = store.stage_claim(stage_id=stage.id, worker="fresh")
    assert fresh.attempt_number == 2

    with pytest.raises(LeaseLost):
        store.attempt_complete(zombie, output={"by": "zombie"})
    store.attempt_complete(fresh, output={"by": "fresh"})

    stage.refresh_from_db()
    assert stage.output == {"by": "fresh"}
    attempts = list(stage.attempts.order_by("number").values_list("status", "error_code"))
    assert attempts == [(AttemptStatus.LOST, "lease_lost"), (AttemptStatus.SUCCEEDED, "")]


def test_heartbeat_extends_the_lease(settings):
    settings.PIPELINE_LEASE_SECONDS = 30
    run = store.run_create(workflow=flow("t-heartbeat"), subject="thing:1", input={})
    claim = store.stage_claim(stage_id=run.stages.get(name="first").id, worker="w")
    Stage.objects.filter(id=claim.stage_id).update(
        lease_expires_at=timezone.now() + timedelta(seconds=1)
    )
    store.stage_heartbeat(claim)
    lease = Stage.objects.get(id=claim.stage_id).lease_expires_at
    assert lease > timezone.now() + timedelta(seconds=25)


def test_transient_errors_are_retried_with_backoff_until_they_pass():
    workflow = flow("t-flaky", StageSpec("middle", flaky, FAST, output=Attempted))
    run = store.run_create(workflow=workflow, subject="thing:1", input={})
    executor.run_execute_inline(run)

    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED
    middle = run.stages.get(name="middle")
    attempts = list(middle.attempts.order_by("number"))
    assert [(a.status, a.error_code) for a in attempts] == [
        ("failed", "hiccup"),
        ("failed", "hiccup"),
        ("succeeded", ""),
    ]
    # Backoff (scaled by the suite to 1/100): 1 s then 2 s nominal -> 10 ms then 20 ms.
    gaps = [(b.started_at - a.finished_at).total_seconds() for a, b in pairwise(attempts)]
    assert gaps[0] >= 0.01 and gaps[1] >= 0.02
    assert run.stages.get(name="first").attempt_count == 1


def test_a_stage_gives_up_after_its_maximum_attempts():
    policy = RetryPolicy(initial_interval_seconds=1, maximum_attempts=2, jitter=0)
    run = store.run_create(
        workflow=flow("t-exhaust", StageSpec("middle", flaky, policy, output=Attempted)),
        subject="thing:1",
        input={},
    )
    executor.run_execute_inline(run)

    run.refresh_from_db()
    assert run.status == RunStatus.FAILED
    assert statuses(run) == [
        ("first", "succeeded", 1),
        ("middle", "failed", 2),
        ("last", "pending", 0),
    ]
    middle = run.stages.get(name="middle")
    assert middle.error_message == "gave up after 2 attempts; last error: the service hiccuped"
    assert middle.failure_kind == FailureKind.EXHAUSTED
    assert run.error.startswith("middle: gave up after 2 attempts")


@pytest.mark.parametrize(
    ("function", "policy", "code"),
    [
        (refused, FAST, "bad_input"),
        (
            unfixable,
            RetryPolicy(maximum_attempts=5, non_retryable_error_codes=("Unfixable",)),
            "Unfixable",
        ),
    ],
)
def test_permanent_errors_fail_at_once(function, policy, code):
    run = store.run_create(
        workflow=flow(f"t-perm-{code}", StageSpec("middle", function, policy, output=Attempted)),
        subject="thing:1",
        input={},
    )
    executor.run_execute_inline(run)
    run.refresh_from_db()
    middle = run.stages.get(name="middle")
    assert (run.status, middle.status, middle.attempt_count, middle.error_code) == (
        "failed",
        "failed",
        1,
        code,
    )
    assert middle.failure_kind == FailureKind.PERMANENT


def test_a_bug_is_retried_within_the_policy_and_its_traceback_kept():
    run = store.run_create(
        workflow=flow("t-bug", StageSpec("middle", buggy, FAST, output=Attempted)),
        subject="thing:1",
        input={},
    )
    executor.run_execute_inline(run)
    attempts = Attempt.objects.filter(stage__run=run, stage__name="middle")
    assert attempts.count() == 3
    assert all("ZeroDivisionError: a bug" in a.traceback for a in attempts)


# The heartbeat runs on its own thread and connection: it must see committed rows.
@pytest.mark.django_db(transaction=True)
def test_an_attempt_past_its_timeout_fails_as_timed_out(settings):
    settings.PIPELINE_LEASE_SECONDS = 1.0
    policy = RetryPolicy(maximum_attempts=1, start_to_close_timeout_seconds=1.2)
    run = store.run_create(
        workflow=flow("t-timeout", StageSpec("middle", slow, policy, output=Nothing)),
        subject="thing:1",
        input={},
    )
    executor.run_execute_inline(run)
    middle = run.stages.get(name="middle")
    assert middle.status == StageStatus.FAILED
    assert middle.attempts.get().error_code == "timeout"


def test_cancel_fences_out_the_running_attempt():
    run = store.run_create(workflow=flow("t-cancel"), subject="thing:1", input={})
    claim = store.stage_claim(stage_id=run.stages.get(name="first").id, worker="w")
    assert store.run_mark_cancelled(run=run, reason="duplicate upload")
    with pytest.raises(LeaseLost):
        store.attempt_complete(claim, output={})
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    assert statuses(run) == [("first", "cancelled", 1), ("last", "cancelled", 0)]
    assert Attempt.objects.get(id=claim.attempt_id).status == AttemptStatus.CANCELLED


def test_a_fork_reuses_outputs_before_its_stage_and_runs_the_rest_anew():
    workflow = flow("t-fork")
    run = store.run_create(workflow=workflow, subject="thing:1", input={})
    executor.run_execute_inline(run)

    fork = store.run_create(
        workflow=workflow, subject="thing:1", input={}, forked_from=run, fork_stage="last"
    )
    original_first = run.stages.get(name="first")
    assert statuses(fork) == [("first", "succeeded", 0), ("last", "ready", 0)]
    assert fork.stages.get(name="first").reused_from == original_first
    executor.run_execute_inline(fork)
    assert fork.stages.get(name="last").output == {"value": 2}
    assert original_first.attempts.count() == 1  # nothing before the fork point ran again


def test_retry_of_a_failed_run_runs_only_the_failed_stage():
    policy = RetryPolicy(maximum_attempts=2, jitter=0)
    run = store.run_create(
        workflow=flow("t-retry", StageSpec("middle", flaky, policy, output=Attempted)),
        subject="thing:1",
        input={},
    )
    executor.run_execute_inline(run)
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED

    store.stage_reopen_failed(run=run)
    executor.run_execute_inline(run)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED
    assert statuses(run) == [
        ("first", "succeeded", 1),
        ("middle", "succeeded", 3),
        ("last", "succeeded", 1),
    ]


def test_retry_policy_backoff_is_exponential_and_capped():
    policy = RetryPolicy(
        initial_interval_seconds=1, backoff_coefficient=2, maximum_interval_seconds=5, jitter=0
    )
    assert [policy.delay_after(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]
    with pytest.raises(ValueError, match="maximum_attempts"):
        RetryPolicy(maximum_attempts=0)


def test_system_check_flags_a_queue_retry_shorter_than_a_stage(settings):
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "retry": 10}
    ids = [message.id for message in checks.check_queue_settings()]
    assert "pipeline.E001" in ids
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "retry": 10**7, "max_attempts": 0}
    assert [message.id for message in checks.check_queue_settings()] == ["pipeline.E002"]


@pytest.mark.parametrize(
    ("backend", "errors"), [("builtin", []), ("temporal", []), ("celery", ["pipeline.E007"])]
)
def test_system_check_knows_the_two_backends(settings, backend, errors):
    settings.PIPELINE_BACKEND = backend
    assert [message.id for message in checks.check_queue_settings()] == errors


def test_a_success_hook_runs_in_the_commit_of_the_output_and_a_failing_one_keeps_nothing(
    settings,
):
    """`StageSpec.on_success` lets a domain write its own rows in the transaction that commits
    a stage's output: they exist exactly when the output does."""
    settings.PIPELINE_RETRY_INTERVAL_SCALE = 0.01
    seen: list[tuple[int, int, bool]] = []

    def hook(run: Run, output: Value) -> None:
        # Inside the commit: the stage is already marked succeeded in this transaction.
        succeeded = run.stages.get(name="first").status == StageStatus.SUCCEEDED
        seen.append((run.pk, output.value, succeeded))
        if len(seen) == 1:
            raise TransientError("the domain's table was locked", code="hook_hiccup")

    workflow = Workflow(
        name="t-hook",
        stages=(
            StageSpec("first", first, FAST, output=Value, on_success=hook),
            StageSpec("last", second, FAST, output=Value),
        ),
    )
    workflow_register(workflow)
    run = store.run_create(workflow=workflow, subject="thing:1", input={})
    executor.run_execute_inline(run)

    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED
    assert seen == [(run.pk, 1, True), (run.pk, 1, True)]
    first_stage = run.stages.get(name="first")
    attempts = list(first_stage.attempts.order_by("number").values_list("status", "error_code"))
    # The hook's failure failed the attempt and rolled its output back; the retry committed.
    assert attempts == [(AttemptStatus.FAILED, "hook_hiccup"), (AttemptStatus.SUCCEEDED, "")]
    assert first_stage.output == {"value": 1}
