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

A stage may also stream its units (`units_stream(ctx, source)`): they keep arriving while the
stage runs, as a visit's audio does while it is recorded, until the producer seals the stage's
input (`stream_seal`). The attempt's worker asks the source for new units between the units it
does, so a stream costs no worker of its own; a later attempt asks the source from the start
and keeps every unit already finished.

Workers of a stage's earlier attempt are fenced out: a unit is the attempt's that planned it,
and its result is kept only while that attempt runs the stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from pipeline.core import dispatch, policy, store
from pipeline.core.context import StageContext, UnitContext
from pipeline.core.errors import LeaseLost, PermanentError, TransientError
from pipeline.core.leases import LeaseKeeper
from pipeline.core.workflow import StageRef, StageSpec

logger = logging.getLogger(__name__)

# How often an attempt waiting for other workers' units looks again; and, while the stage's
# input is still arriving, for new units too (slower: a visit may last hours).
_POLL_SECONDS = 0.1
_STREAM_POLL_SECONDS = 0.25


def units_run(ctx: StageContext, items: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The result of every unit in `items`, done by this worker and any free one on the queue."""
    return _units_drive(ctx, lambda sealed: (items, True), sealed=lambda: True)


# A stream's source: given whether the stage's input is sealed, every unit known so far, in
# order (a list that only grows), and whether that list is the last one it will give.
StreamSource = Callable[[bool], tuple[Sequence[tuple[str, dict[str, Any]]], bool]]


def units_stream(ctx: StageContext, source: StreamSource) -> dict[str, Any]:
    """As `units_run`, for units that keep arriving while the stage runs (audio transcribed
    while it is recorded). `source` is asked on every round; new units are planned and taken
    at once, with the same leases, fencing and checkpoints as `units_run`'s. The stage ends
    when its input is sealed (`stream_seal`), `source` has said it gave its last unit, and
    every unit is done; the results of all of them, in order."""
    return _units_drive(ctx, source, sealed=lambda: store.stage_sealed(ctx.claim))


def stream_seal(run_id: int, ref: StageRef[Any]) -> bool:
    """No more units will arrive for the run's streaming stage `ref`: once it has done those it
    has, it ends. False if its input was already sealed. Allowed before the stage opens."""
    return store.stage_seal(run_id=run_id, stage_name=ref.name)


def _units_drive(
    ctx: StageContext, source: StreamSource, *, sealed: Callable[[], bool]
) -> dict[str, Any]:
    """Plan what `source` gives, do units until none is left to take, wait for the other
    workers' to finish; until the source's list is sealed and whole."""
    claim = ctx.claim
    spec = claim.spec
    if spec.unit is None:
        raise TypeError(f"stage {spec.name!r} declares no unit function to fan out to")
    kept = ctx.checkpoints()
    keys: list[str] = []
    reused = 0
    own_error: BaseException | None = None
    reported: tuple[int, int | None] | None = None
    while True:
        # The lease is extended by the attempt's heartbeat thread; here only ask whether it
        # was lost, and write progress only when it moved: the wait polls several times a second.
        ctx.lease_check()
        is_sealed = sealed()
        items, last = source(is_sealed)
        whole = is_sealed and last
        seen = len(keys)
        pending = _units_new(spec, keys, items, kept)
        reused += len(keys) - seen - len(pending)
        if pending:
            store.units_plan(claim, pending)
            dispatch.units_enqueue(claim, count=len(pending) - 1)
        state = store.units_state(claim)
        if (state.done, len(keys) if whole else None) != reported:
            reported = (state.done, len(keys) if whole else None)
            ctx.progress(reused + state.done, reported[1])
        failing = own_error is not None or bool(state.failed)
        if not failing:
            unit = store.unit_claim(stage_id=claim.stage_id, worker=claim.worker)
            if unit is not None:
                own_error = unit_execute(spec, unit)
                continue
            if whole and state.ready == 0 and state.running == 0:
                break
        elif state.running == 0:
            # Every unit still running has finished: nothing more can be kept by waiting.
            raise own_error or _unit_error(state.failed[0])
        time.sleep(_POLL_SECONDS if whole else _STREAM_POLL_SECONDS)
    kept = ctx.checkpoints()
    return {key: kept[key] for key in keys}


def _units_new(
    spec: StageSpec,
    keys: list[str],
    items: Sequence[tuple[str, dict[str, Any]]],
    kept: dict[str, Any],
) -> list[tuple[int, str, dict[str, Any]]]:
    """The units of `items` beyond the `keys` already seen (which it extends), as (index, key,
    input), leaving out those an earlier attempt finished."""
    if [key for key, _ in items[: len(keys)]] != keys:
        raise ValueError(f"stage {spec.name!r} changed units it had already given")
    new = list(enumerate(items[len(keys) :], start=len(keys)))
    keys.extend(key for _, (key, _) in new)
    if len(set(keys)) != len(keys):
        raise ValueError(f"stage {spec.name!r} named a unit twice")
    return [(index, key, value) for index, (key, value) in new if key not in kept]


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
