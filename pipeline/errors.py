"""Every error the engine reasons about, and the one function that decides what is retried.

Transient errors are worth another attempt after a backoff; permanent errors fail the stage at
once with a message that says what to fix. Anything else a stage raises is a bug: it is treated
as transient (the attempt is retried within its policy) so that a crash in our own code does
not silently drop a visit, and its traceback is kept on the attempt.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of the engine's errors. `code` is a stable identifier kept on the attempt."""

    code = "pipeline_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class TransientError(PipelineError):
    """Worth retrying: timeouts, dropped connections, rate limits, 5xx."""

    code = "transient"

    def __init__(
        self, message: str, *, code: str | None = None, retry_after_seconds: float | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after_seconds = retry_after_seconds


class PermanentError(PipelineError):
    """Retrying cannot help: bad input, bad credentials, a refused request, a budget."""

    code = "permanent"


class LeaseLost(TransientError):
    """This worker no longer owns the stage: its lease expired or a newer attempt exists.

    Raised by heartbeats and by fenced completion; the worker must stop and write nothing."""

    code = "lease_lost"


class AttemptTimedOut(TransientError):
    """The attempt ran past its start-to-close timeout."""

    code = "timeout"


class OutputInvalid(PermanentError):
    """A model's answer failed its schema even after one repair request."""

    code = "output_invalid"


class BudgetExceeded(PermanentError):
    """The run would spend more tokens than its budget allows."""

    code = "budget_exceeded"


def is_retryable(
    exc: BaseException, *, non_retryable: tuple[type[BaseException], ...] = ()
) -> bool:
    """Whether an attempt that raised `exc` may be tried again (within its policy)."""
    if isinstance(exc, (*non_retryable, PermanentError)):
        return False
    # Unknown exceptions are bugs or environment hiccups; the policy's attempt limit bounds them.
    return isinstance(exc, Exception)


def error_code(exc: BaseException) -> str:
    return exc.code if isinstance(exc, PipelineError) else type(exc).__name__
