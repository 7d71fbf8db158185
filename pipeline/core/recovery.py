"""The recovery sweep: nothing is lost because a message or a worker was.

It takes back stages whose lease expired (their worker died or stalled) and sends a wake-up
for every ready stage whose retry is due and that no recent message carries."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.conf import settings

from pipeline.core import dispatch, policy, store
from pipeline.core.artifacts import attempt_artifacts_discard

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepResult:
    reaped: int
    enqueued: int


def leases_reap() -> list[store.ExpiredLease]:
    """Take back stages whose worker stopped heartbeating, retry or fail them by their policy,
    and remove what the lost attempt half-wrote."""
    reaped = []
    for expired in store.stages_lease_expired():
        spec = expired.spec
        failure = policy.failure_from_expired_lease(
            spec.policy,
            worker=expired.worker,
            attempt_started_at=expired.attempt_started_at,
            lease_expires_at=expired.lease_expires_at,
        )
        decision = spec.judge(failure, attempts_made=expired.attempt_number)
        if store.stage_reap(expired, failure, decision) is not None:
            attempt_artifacts_discard(expired.run_id, expired.stage_name, expired.attempt_number)
            reaped.append(expired)
    return reaped


def sweep() -> SweepResult:
    reaped = leases_reap()
    # A message older than this is presumed lost (its worker may have died holding it).
    requeue_after = max(float(settings.PIPELINE_LEASE_SECONDS), 2 * settings.PIPELINE_SWEEP_SECONDS)
    due = store.stages_due(requeue_after_seconds=requeue_after)
    dispatch.stage_enqueue([stage.id for stage in due])
    if reaped or due:
        logger.info("sweep: %d lease(s) expired, %d stage(s) enqueued", len(reaped), len(due))
    return SweepResult(reaped=len(reaped), enqueued=len(due))
