"""Every retry decision, as pure functions of a stage's policy, an error and an attempt count.

Whether an error is worth another attempt, how long to wait first, when to give up and how
long an attempt may hold its lease are decided here and nowhere else. The store records what
these functions decide; nothing here touches the database, so each rule is unit-tested alone.
The shape of `RetryPolicy` is the one Temporal made familiar.
"""

from __future__ import annotations

import random
import re
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pipeline.core.errors import (
    AttemptTimedOut,
    LeaseLost,
    PermanentError,
    PipelineError,
    TransientError,
    error_code,
)
from pipeline.core.states import FailureKind


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how patiently, a stage is tried.

    The delay before attempt n+1 is initial * coefficient**(n-1), capped at the maximum, then
    spread by +/- jitter (a fraction) so that a backlog does not retry in lockstep. Errors
    whose code is in `non_retryable_error_codes` fail the stage at once, as do every
    `PermanentError`."""

    initial_interval_seconds: float = 1.0
    backoff_coefficient: float = 2.0
    maximum_interval_seconds: float = 60.0
    maximum_attempts: int = 5
    jitter: float = 0.2
    start_to_close_timeout_seconds: float = 600.0
    non_retryable_error_codes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.maximum_attempts < 1:
            raise ValueError("maximum_attempts must be at least 1")
        if self.initial_interval_seconds < 0 or self.maximum_interval_seconds < 0:
            raise ValueError("intervals must not be negative")
        if self.backoff_coefficient < 1:
            raise ValueError("backoff_coefficient must be at least 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter is a fraction in [0, 1)")
        if self.start_to_close_timeout_seconds <= 0:
            raise ValueError("start_to_close_timeout_seconds must be positive")

    def delay_after(self, attempt_number: int, *, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt `attempt_number` (1-based) before the next."""
        base = self.initial_interval_seconds * self.backoff_coefficient ** (attempt_number - 1)
        base = min(base, self.maximum_interval_seconds)
        if self.jitter:
            base *= 1 + (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base)

    def worst_case_seconds(self, *, inline_wait_seconds: float) -> float:
        """The longest one worker may spend on this stage: every attempt to its timeout, and
        the backoffs it waits out in place between them."""
        waits = (self.maximum_attempts - 1) * inline_wait_seconds
        return self.start_to_close_timeout_seconds * self.maximum_attempts + waits


@dataclass(frozen=True)
class Failure:
    """How an attempt ended badly, classified."""

    code: str
    message: str
    traceback: str
    retryable: bool
    retry_after_seconds: float | None = None
    # A lost worker is not an overloaded provider: its stage is retried at once, not backed off.
    backoff: bool = True


@dataclass(frozen=True)
class Decision:
    """What happens to a stage after a failed attempt: retry after a delay, or give up."""

    retry_in_seconds: float | None  # None: give up
    gave_up: FailureKind | None
    message: str  # for people: the error, and why it is final when it is

    @property
    def retry(self) -> bool:
        return self.retry_in_seconds is not None


def is_retryable(exc: BaseException, policy: RetryPolicy | None = None) -> bool:
    """Whether an attempt that raised `exc` may be tried again (within its policy).

    Unknown exceptions are bugs or environment hiccups: retried, and the policy's attempt limit
    bounds them, so that a crash in our own code does not silently drop work."""
    if isinstance(exc, PermanentError):
        return False
    if policy is not None and error_code(exc) in policy.non_retryable_error_codes:
        return False
    return isinstance(exc, Exception)


# Answers of an HTTP service worth asking again: a timeout, a conflict that a moment may
# resolve, a rate limit; and every 5xx. Anything else in 4xx is the request's own fault.
TRANSIENT_HTTP_STATUSES = frozenset({408, 409, 429})


def http_status_is_transient(status: int) -> bool:
    return status in TRANSIENT_HTTP_STATUSES or status >= 500


def retry_after_seconds(header: str | None) -> float | None:
    """The delay an HTTP `Retry-After` header asks for, in seconds; None if absent or a date."""
    try:
        return max(0.0, float(header)) if header is not None else None
    except ValueError:
        return None


# pydantic quotes the value it refused ("input_value='...'"): in a stage that is a piece of
# a transcript or a model's answer, which must not be copied into stored errors.
_INPUT_VALUE = re.compile(r"input_value=.*?(?=, input_type=)", re.S)


def scrubbed(text: str) -> str:
    """`text` without the input values validation errors quote (their type stays)."""
    return _INPUT_VALUE.sub("input_value=<withheld>", text)


def _translated(exc: BaseException) -> list[BaseException]:
    """The foreign errors in `exc`'s chain that one of ours was raised from."""
    found: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        cause = current.__cause__
        ours = isinstance(current, PipelineError)
        if ours and cause is not None and not isinstance(cause, PipelineError):
            found.append(cause)
        suppressed = cause is not None or current.__suppress_context__
        current = cause if suppressed else current.__context__
    return found


def formatted_traceback(exc: BaseException) -> str:
    """`exc`'s traceback, chain and all. An error of ours raised from a foreign one has said in
    its own words what happened; what the foreign one said (a provider's answer, which may
    quote our request) is withheld, its type and stack kept."""
    text = "".join(traceback.format_exception(exc))
    for foreign in _translated(exc):
        said = "".join(traceback.format_exception_only(foreign))
        kind = said.split(":", 1)[0].rstrip("\n")
        text = text.replace(said, f"{kind}: <message withheld>\n")
    return scrubbed(text)


def failure_from_exception(exc: BaseException, policy: RetryPolicy) -> Failure:
    return Failure(
        code=error_code(exc)[:64],
        message=scrubbed(str(exc)) or type(exc).__name__,
        traceback=formatted_traceback(exc),
        retryable=is_retryable(exc, policy),
        retry_after_seconds=exc.retry_after_seconds if isinstance(exc, TransientError) else None,
    )


def failure_from_expired_lease(
    policy: RetryPolicy, *, worker: str, attempt_started_at: datetime, lease_expires_at: datetime
) -> Failure:
    """The attempt of a worker that stopped heartbeating: it timed out if its lease had
    reached the attempt's deadline, else the worker was killed or stalled."""
    deadline = attempt_started_at + timedelta(seconds=policy.start_to_close_timeout_seconds)
    if lease_expires_at >= deadline:
        return Failure(
            code=AttemptTimedOut.code,
            message="the attempt ran past its start-to-close timeout",
            traceback="",
            retryable=True,
            backoff=False,
        )
    return Failure(
        code=LeaseLost.code,
        message=f"worker {worker or '?'} stopped heartbeating (killed or stalled); "
        "its lease expired",
        traceback="",
        retryable=True,
        backoff=False,
    )


def retry_decision(
    policy: RetryPolicy,
    failure: Failure,
    *,
    attempts_made: int,
    interval_scale: float = 1.0,
    rng: random.Random | None = None,
) -> Decision:
    """After `attempts_made` attempts, the last of which ended in `failure`: retry or give up.

    `interval_scale` shrinks every wait (tests run backoffs at a hundredth of their length);
    a provider's Retry-After is honoured as a minimum."""
    if not failure.retryable:
        return Decision(None, FailureKind.PERMANENT, failure.message)
    if attempts_made >= policy.maximum_attempts:
        return Decision(
            None,
            FailureKind.EXHAUSTED,
            f"gave up after {attempts_made} attempts; last error: {failure.message}",
        )
    delay = policy.delay_after(attempts_made, rng=rng) if failure.backoff else 0.0
    if failure.retry_after_seconds is not None:
        delay = max(delay, failure.retry_after_seconds)
    return Decision(delay * interval_scale, None, failure.message)


def attempt_deadline(policy: RetryPolicy, *, started_at: datetime) -> datetime:
    return started_at + timedelta(seconds=policy.start_to_close_timeout_seconds)


def lease_until(*, now: datetime, deadline: datetime, lease_seconds: float) -> datetime:
    """A lease runs for `lease_seconds` from now, never past the attempt's deadline."""
    return min(now + timedelta(seconds=lease_seconds), deadline)
