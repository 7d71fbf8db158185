"""Retry policies, in the shape Temporal made familiar."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how patiently, a stage is tried.

    The delay before attempt n+1 is initial * coefficient**(n-1), capped at the maximum, then
    spread by +/- jitter (a fraction) so that a backlog does not retry in lockstep.
    """

    initial_interval_seconds: float = 1.0
    backoff_coefficient: float = 2.0
    maximum_interval_seconds: float = 60.0
    maximum_attempts: int = 5
    jitter: float = 0.2
    start_to_close_timeout_seconds: float = 600.0
    non_retryable_errors: tuple[type[BaseException], ...] = field(default=())

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
