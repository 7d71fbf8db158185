"""The recovery sweep: nothing is lost because a message or a worker was.

It takes back stages whose lease expired (their worker died or stalled) and sends a wake-up
for every ready stage whose retry is due and that no recent message carries."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.conf import settings

from pipeline import dispatch, store
from pipeline.context import attempt_artifacts_discard

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepResult:
    reaped: int
    enqueued: int


def leases_reap() -> list[store.Reaped]:
    """Take back stages whose worker stopped heartbeating, and remove what it half-wrote."""
    reaped = store.stages_reap_expired()
    for lost in reaped:
        attempt_artifacts_discard(lost.run_id, lost.stage_name, lost.attempt_number)
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
