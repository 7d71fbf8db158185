"""The application's one error hierarchy. Every error has a stable `code`, kept on attempts
and shown to people beside its message.

- `TransientError`: worth another attempt after a backoff (timeouts, rate limits, 5xx).
- `PermanentError`: retrying cannot help; the stage fails at once with a message that says
  what to fix. Domains subclass it for their own (an unreadable recording, no speech).
- `OperationRefused`: an operator's or user's request that makes no sense in the current
  state (retry a run with nothing failed, sign a note twice); nothing was changed.

Whether an error is retried is decided in `pipeline.core.policy`.
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


class StageOutputInvalid(PermanentError):
    """A stage returned something that is not its declared output model: a bug in the stage."""

    code = "stage_output_invalid"


class OperationRefused(PipelineError):
    """The operation makes no sense in the current state; the message says why."""

    code = "operation_refused"


def error_code(exc: BaseException) -> str:
    """The stable code of an error: ours carry one, anything else is named by its type."""
    return exc.code if isinstance(exc, PipelineError) else type(exc).__name__


class ModelNotAllowed(PermanentError):
    """The run names a model its stage's policy does not allow."""

    code = "model_not_allowed"


class ModelUnpriced(PermanentError):
    """The price table has no row for the model: its calls would be recorded at $0."""

    code = "model_unpriced"
