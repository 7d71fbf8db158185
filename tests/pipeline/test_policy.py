"""Retry decisions are pure: a policy, an error and an attempt count in, a decision out.

No database here: every rule of `pipeline.core.policy` is checked on its own."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel, ValidationError

from pipeline.core.errors import (
    AttemptTimedOut,
    BudgetExceeded,
    LeaseLost,
    OutputInvalid,
    PermanentError,
    TransientError,
)
from pipeline.core.policy import (
    Failure,
    RetryPolicy,
    attempt_deadline,
    failure_from_exception,
    failure_from_expired_lease,
    is_retryable,
    lease_until,
    retry_decision,
)
from pipeline.core.states import FailureKind

POLICY = RetryPolicy(
    initial_interval_seconds=2,
    backoff_coefficient=3,
    maximum_interval_seconds=30,
    maximum_attempts=4,
    jitter=0,
    start_to_close_timeout_seconds=60,
    non_retryable_error_codes=("quota_gone",),
)
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def transient(message: str = "hiccup", **kwargs: object) -> Failure:
    return failure_from_exception(TransientError(message, **kwargs), POLICY)


def test_backoff_grows_by_the_coefficient_and_stops_at_the_cap():
    delays = [
        retry_decision(POLICY, transient(), attempts_made=n).retry_in_seconds for n in (1, 2, 3)
    ]
    assert delays == [2, 6, 18]
    assert RetryPolicy(maximum_interval_seconds=5, jitter=0).delay_after(10) == 5


def test_jitter_spreads_the_delay_within_its_fraction():
    policy = RetryPolicy(initial_interval_seconds=10, jitter=0.2)
    rng = random.Random(7)
    delays = [policy.delay_after(1, rng=rng) for _ in range(200)]
    assert min(delays) >= 8 and max(delays) <= 12
    assert max(delays) - min(delays) > 2  # spread, not one value


def test_the_last_allowed_attempt_gives_up_as_exhausted():
    decision = retry_decision(POLICY, transient("rate limited"), attempts_made=4)
    assert not decision.retry
    assert decision.gave_up == FailureKind.EXHAUSTED
    assert decision.message == "gave up after 4 attempts; last error: rate limited"


@pytest.mark.parametrize(
    "error",
    [
        PermanentError("bad input"),
        OutputInvalid("still invalid"),
        BudgetExceeded("over budget"),
        TransientError("the quota is gone", code="quota_gone"),  # named by the policy
    ],
)
def test_permanent_and_declared_non_retryable_errors_fail_at_once(error):
    failure = failure_from_exception(error, POLICY)
    decision = retry_decision(POLICY, failure, attempts_made=1)
    assert (decision.retry, decision.gave_up) == (False, FailureKind.PERMANENT)
    assert decision.message == str(error)


def test_a_bug_is_retried_and_named_by_its_type():
    failure = failure_from_exception(ZeroDivisionError("division by zero"), POLICY)
    assert failure.retryable and failure.code == "ZeroDivisionError"
    assert "ZeroDivisionError" in failure.traceback
    assert retry_decision(POLICY, failure, attempts_made=1).retry


def test_a_cancellation_is_never_retried():
    assert not is_retryable(KeyboardInterrupt(), POLICY)


def test_retry_after_from_the_provider_is_a_minimum_and_the_scale_applies_to_all():
    failure = transient(retry_after_seconds=40)
    assert retry_decision(POLICY, failure, attempts_made=1).retry_in_seconds == 40
    scaled = retry_decision(POLICY, failure, attempts_made=1, interval_scale=0.01)
    assert scaled.retry_in_seconds == pytest.approx(0.4)


def test_a_lost_worker_is_retried_at_once_not_backed_off():
    failure = failure_from_expired_lease(
        POLICY,
        worker="host:1",
        attempt_started_at=NOW,
        lease_expires_at=NOW + timedelta(seconds=10),
    )
    assert failure.code == LeaseLost.code and "host:1" in failure.message
    assert retry_decision(POLICY, failure, attempts_made=1).retry_in_seconds == 0


def test_a_lease_that_reached_the_deadline_means_the_attempt_timed_out():
    deadline = attempt_deadline(POLICY, started_at=NOW)
    assert deadline == NOW + timedelta(seconds=60)
    failure = failure_from_expired_lease(
        POLICY, worker="w", attempt_started_at=NOW, lease_expires_at=deadline
    )
    assert failure.code == AttemptTimedOut.code


def test_a_lease_never_runs_past_the_deadline():
    deadline = NOW + timedelta(seconds=10)
    assert lease_until(now=NOW, deadline=deadline, lease_seconds=30) == deadline
    assert lease_until(now=NOW, deadline=deadline, lease_seconds=4) == NOW + timedelta(seconds=4)


def test_worst_case_covers_every_attempt_and_the_waits_between():
    assert POLICY.worst_case_seconds(inline_wait_seconds=15) == 60 * 4 + 15 * 3


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("maximum_attempts", 0, "maximum_attempts"),
        ("backoff_coefficient", 0.5, "backoff_coefficient"),
        ("jitter", 1.0, "jitter"),
        ("start_to_close_timeout_seconds", 0, "start_to_close"),
    ],
)
def test_a_nonsensical_policy_is_refused_where_it_is_declared(field, value, message):
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**{field: value})


def test_a_stored_failure_never_quotes_the_value_validation_refused():
    class Dose(BaseModel):
        milligrams: int
        route: str

    try:
        Dose.model_validate(
            {"milligrams": "the patient, Ada, takes warfarin", "route": ["oral", 1]}
        )
    except ValidationError as exc:
        failure = failure_from_exception(exc, RetryPolicy())
    assert "warfarin" not in failure.message and "warfarin" not in failure.traceback
    assert "oral" not in failure.message
    assert "input_value=<withheld>, input_type=str" in failure.message
    assert "int_parsing" in failure.message  # the error's type stays
