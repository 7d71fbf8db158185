"""Runs attempts: claim, call the stage function, commit or classify the failure, go on.

After a stage commits, the same worker claims the next stage at once when it belongs to the
same queue (as DBOS runs steps inline): the gap between stages is a database round trip, not a
queue round trip. A stage bound for another queue is handed to the broker instead.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog
from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from pipeline.core import dispatch, policy, recovery, store, tracing
from pipeline.core.context import StageContext
from pipeline.core.errors import LeaseLost
from pipeline.core.leases import Heartbeat
from pipeline.core.models import Run, Stage
from pipeline.core.states import FINAL_RUN_STATUSES, StageStatus
from pipeline.core.workflow import workflow_get

logger = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def stage_execute(stage_id: int, *, worker: str | None = None) -> None:
    """Run a stage that a queue message (or a caller) says is ready, and what follows inline.

    Safe to call for a stage that is not ready, already running elsewhere or finished: the
    claim fails and nothing happens. That is what makes redelivery harmless."""
    worker = worker or worker_name()
    next_id: int | None = stage_id
    while next_id is not None:
        claim = store.stage_claim(stage_id=next_id, worker=worker)
        if claim is None:
            return
        next_id = _attempt_run(claim)


@dataclass(frozen=True)
class AttemptOutcome:
    """How an attempt ended, as recorded: the stage's status after it; after a success the
    stage that follows, after a failure how it was classified and what the policy decided."""

    stage_status: str
    next_stage: Stage | None = None
    failure: policy.Failure | None = None
    decision: policy.Decision | None = None
    retry_at: datetime | None = None


LOST = AttemptOutcome(stage_status="lost")  # the lease went elsewhere: nothing was recorded


def _attempt_run(claim: store.Claim) -> int | None:
    """Run one attempt; return the id of the stage this worker should claim next, if any."""
    outcome = attempt_execute(claim)
    if outcome.failure is None:
        next_stage = outcome.next_stage
        if next_stage is None:
            return None
        spec = claim.spec
        if workflow_get(claim.workflow).stage(next_stage.name).queue == spec.queue:
            return next_stage.id
        dispatch.stage_enqueue([next_stage.id])
        return None
    if outcome.stage_status != StageStatus.READY or outcome.retry_at is None:
        return None
    # A short backoff is waited out here; a long one is left to the recovery sweep, so a
    # worker is never parked for minutes.
    wait = (outcome.retry_at - timezone.now()).total_seconds()
    if wait > settings.PIPELINE_INLINE_RETRY_MAX_SECONDS:
        return None
    time.sleep(max(0.0, wait))
    return claim.stage_id


def attempt_execute(
    claim: store.Claim, *, beat: Callable[[], None] | None = None
) -> AttemptOutcome:
    """Run one attempt of a claimed stage and record how it ended; the same path whichever
    backend scheduled it. `beat` is called with every lease extension (Temporal's heartbeat).
    Every line logged meanwhile, here or in the stage, names the attempt (`config.logs`)."""
    with structlog.contextvars.bound_contextvars(
        subject=claim.subject,
        run=claim.run_id,
        stage=claim.stage_name,
        attempt=claim.attempt_number,
    ):
        return _attempt_execute_bound(claim, beat)


def _attempt_execute_bound(claim: store.Claim, beat: Callable[[], None] | None) -> AttemptOutcome:
    spec = claim.spec
    started = time.monotonic()
    with tracing.attempt_span(claim), Heartbeat(claim, also=beat) as heartbeat:
        ctx = StageContext(claim, heartbeat)
        try:
            returned = spec.run(ctx)
            heartbeat.check()
            output = spec.output_dump(returned)
            ctx.usage.compute_seconds = ctx.usage.compute_seconds or time.monotonic() - started
            next_stage = store.attempt_complete(claim, output=output, usage=ctx.usage)
        except LeaseLost as exc:
            # Someone else owns the stage now (or it was cancelled): write nothing more.
            tracing.attempt_failed(exc)
            logger.warning(
                "attempt %s of stage %s (run %s) lost its lease; discarding its work",
                claim.attempt_number,
                claim.stage_name,
                claim.run_id,
            )
            ctx.discard_artifacts()
            return LOST
        except DatabaseError as exc:
            # The connection may have failed at COMMIT after the database committed, and the
            # committed output refers to the artifacts: they go only once the database says
            # the attempt did not succeed. If it cannot say, they stay; should the attempt
            # turn out lost, the sweep removes them when it takes the lease back.
            if not store.attempt_succeeded(claim):
                ctx.discard_artifacts()
                return _attempt_failed(claim, ctx, exc, elapsed=time.monotonic() - started)
            logger.warning(
                "attempt %s of stage %s (run %s) committed although its commit raised %s",
                claim.attempt_number,
                claim.stage_name,
                claim.run_id,
                type(exc).__name__,
            )
            next_stage = store.stage_after(claim)
        except Exception as exc:
            ctx.discard_artifacts()
            return _attempt_failed(claim, ctx, exc, elapsed=time.monotonic() - started)
    logger.info(
        "run %s stage %s attempt %s succeeded in %.2fs",
        claim.run_id,
        claim.stage_name,
        claim.attempt_number,
        time.monotonic() - started,
    )
    return AttemptOutcome(stage_status=StageStatus.SUCCEEDED, next_stage=next_stage)


def _attempt_failed(
    claim: store.Claim, ctx: StageContext, exc: Exception, *, elapsed: float
) -> AttemptOutcome:
    spec = claim.spec
    failure = policy.failure_from_exception(exc, spec.policy)
    decision = spec.judge(failure, attempts_made=claim.attempt_number)
    ctx.usage.compute_seconds = ctx.usage.compute_seconds or elapsed
    stage = store.attempt_fail(claim, failure, decision, usage=ctx.usage)
    logger.warning(
        "run %s stage %s attempt %s failed (%s)%s",
        claim.run_id,
        claim.stage_name,
        claim.attempt_number,
        failure.code,
        "" if stage is None else f"; stage is now {stage.status}",
    )
    tracing.attempt_failed(exc)
    if stage is None:
        return LOST
    return AttemptOutcome(
        stage_status=stage.status,
        failure=failure,
        decision=decision,
        retry_at=stage.next_attempt_at,
    )


def run_execute_inline(run: Run, *, worker: str | None = None) -> Run:
    """Drive a run to a final state in this process, backoffs included (no cluster needed)."""
    worker = worker or worker_name()
    while True:
        run.refresh_from_db()
        if run.status in FINAL_RUN_STATUSES:
            return run
        ready = store.run_ready_stages(run.id)
        if not ready:
            # A stage is running elsewhere (or its lease must expire first): wait for it.
            recovery.leases_reap()
            time.sleep(0.2)
            continue
        stage = ready[0]
        wait = (
            (stage.next_attempt_at - timezone.now()).total_seconds() if stage.next_attempt_at else 0
        )
        if wait > 0:
            time.sleep(wait)
        stage_execute(stage.id, worker=worker)
