"""Stages that fan out: one stage's work split into units that any free worker takes.

A stage declares the function that does one unit (`StageSpec.unit`) and, in its own function,
hands the engine the units it needs (`units_run(ctx, items)`): a list of (key, input) in the
order the results are wanted. The engine then

- keeps the results of units an earlier attempt finished (they are the stage's checkpoints)
  and plans the others for this attempt;
- sends a wake-up per unit beyond the first to the stage's queue, so that every free worker
  there, on any host, takes units while the attempt's own worker takes them too;
- runs each unit under a lease of its own, heartbeated: a unit whose worker dies is taken
  again by another, alone, once its lease expires;
- fails the attempt with a unit's error once the units still running have finished, so the
  stage's retry policy decides, and its next attempt redoes only the units not kept;
- returns the results in the order asked, when every unit is done.

Workers of a stage's earlier attempt are fenced out: a unit is the attempt's that planned it,
and its result is kept only while that attempt runs the stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import structlog

from pipeline.core import dispatch, policy, store
from pipeline.core.context import StageContext, UnitContext
from pipeline.core.errors import LeaseLost, PermanentError, TransientError
from pipeline.core.leases import LeaseKeeper
from pipeline.core.workflow import StageSpec

logger = logging.getLogger(__name__)

# How often an attempt waiting for other workers' units looks again.
_POLL_SECONDS = 0.1


def units_run(ctx: StageContext, items: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The result of every unit in `items`, done by this worker and any free one on the queue."""
    claim = ctx.claim
    spec = claim.spec
    if spec.unit is None:
        raise TypeError(f"stage {spec.name!r} declares no unit function to fan out to")
    keys = [key for key, _ in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f"stage {spec.name!r} named a unit twice")
    kept = ctx.checkpoints()
    pending = [(key, value) for key, value in items if key not in kept]
    if pending:
        store.units_plan(claim, pending)
        dispatch.units_enqueue(claim, count=len(pending) - 1)
        _units_await(ctx, spec, total=len(items), kept=len(items) - len(pending))
        kept = ctx.checkpoints()
    return {key: kept[key] for key in keys}


def _units_await(ctx: StageContext, spec: StageSpec, *, total: int, kept: int) -> None:
    """Do units until none is left to take, then wait for the other workers' to finish."""
    claim = ctx.claim
    own_error: BaseException | None = None
    reported = -1
    while True:
        # The lease is extended by the attempt's heartbeat thread; here only ask whether it
        # was lost, and write progress only when it moved: the wait polls every 0.1 s.
        ctx.lease_check()
        state = store.units_state(claim)
        if state.done != reported:
            reported = state.done
            ctx.progress(kept + state.done, total)
        failing = own_error is not None or bool(state.failed)
        if not failing:
            unit = store.unit_claim(stage_id=claim.stage_id, worker=claim.worker)
            if unit is not None:
                own_error = unit_execute(spec, unit)
                continue
            if state.ready == 0 and state.running == 0:
                return
        elif state.running == 0:
            # Every unit still running has finished: nothing more can be kept by waiting.
            raise own_error or _unit_error(state.failed[0])
        time.sleep(_POLL_SECONDS)


def _unit_error(unit: Any) -> Exception:
    """The error a unit another worker ran failed with, as this attempt's failure."""
    message = f"unit {unit.index} ({unit.key}) failed on {unit.worker}: {unit.error_message}"
    kind = TransientError if unit.retryable else PermanentError
    return kind(message, code=unit.error_code or None)


def unit_execute(spec: StageSpec, claim: store.UnitClaim) -> BaseException | None:
    """Do one unit under its lease and keep its result; the error it failed with, if it did.
    A unit whose lease was lost is abandoned: its new owner does it."""
    assert spec.unit is not None
    started = time.monotonic()
    with LeaseKeeper(lambda: store.unit_heartbeat(claim), name="unit-heartbeat") as keeper:
        try:
            value = spec.unit(UnitContext(claim, keeper))
            keeper.check()
        except LeaseLost:
            return None
        except Exception as exc:
            failure = policy.failure_from_exception(exc, spec.policy)
            store.unit_fail(claim, failure, seconds=time.monotonic() - started)
            logger.warning("unit %s of stage %s failed (%s)", claim.key, spec.name, failure.code)
            return exc
    if not store.unit_complete(claim, value=value, seconds=time.monotonic() - started):
        logger.warning(
            "unit %s of stage %s lost its lease; its result is dropped", claim.key, spec.name
        )
    return None


def units_work(stage_id: int, *, worker: str) -> int:
    """Take the units of a running stage until none is left (a queue message's work); the
    number done here. Stops at the first unit that fails: the attempt decides what follows."""
    done = 0
    while (claim := store.unit_claim(stage_id=stage_id, worker=worker)) is not None:
        spec = claim.spec
        with structlog.contextvars.bound_contextvars(
            subject=claim.subject,
            run=claim.run_id,
            stage=claim.stage_name,
            attempt=claim.attempt_number,
            unit=claim.key,
        ):
            if unit_execute(spec, claim) is not None:
                return done
        done += 1
    return done
