"""Stages whose units keep arriving while they run (`pipeline.core.units.units_stream`): units
given after the workers went idle are done; a unit lost mid-stream is taken again alone; the
stage ends only once its input is sealed, and not before the units running then are done; a
second seal changes nothing; a cancel stops the stream; a later attempt keeps what was done.

The producer is scripted inside the source (it runs on the attempt's own thread): on each round
it may give more numbers or seal the input, as a recorder's uploads would between rounds."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import pytest
from pydantic import BaseModel

from pipeline.core import executor, store
from pipeline.core.context import UnitContext
from pipeline.core.errors import TransientError
from pipeline.core.models import Run, Stage, Unit
from pipeline.core.operations import Operator, run_cancel
from pipeline.core.selectors import stage_output
from pipeline.core.states import RunStatus, StageStatus
from pipeline.core.units import stream_seal, units_stream
from pipeline.core.workflow import StageRef, StageSpec, Workflow, workflow_register
from tests.pipeline.test_units import FAN

pytestmark = pytest.mark.django_db(transaction=True)


class Squares(BaseModel):
    squares: list[int]


STREAM = StageRef("squares", Squares)

# The numbers given so far, the producer's script for each round, and which units ran.
given: list[int] = []
script: list[Callable[[Run], None]] = []
rounds_seen: list[bool] = []
done_by: list[tuple[str, str]] = []
faults: dict[str, list[str]] = {}
on_unit: dict[str, Callable[[UnitContext], None]] = {}


def square(unit: UnitContext) -> int:
    key = unit.claim.key
    done_by.append((key, unit.claim.worker))
    hook = on_unit.get(key)
    if hook is not None:
        hook(unit)
    if faults.get(key):
        faults[key].pop(0)
        raise TransientError(f"unit {key} hiccuped", code="hiccup")
    time.sleep(float(unit.run_input.get("unit_seconds", 0)))
    return int(unit.input["n"]) ** 2


def stream_squares(ctx) -> Squares:
    run = Run.objects.get(id=ctx.run_id)

    def source(sealed: bool) -> tuple[list[tuple[str, dict[str, int]]], bool]:
        rounds_seen.append(sealed)
        if script:
            script.pop(0)(run)
        return [(f"n:{n}", {"n": n}) for n in given], sealed

    results = units_stream(ctx, source)
    return Squares(squares=[results[f"n:{n}"] for n in given])


LIVE = Workflow(
    name="stream-test",
    stages=(
        StageSpec(
            name=STREAM.name,
            run=stream_squares,
            unit=square,
            output=Squares,
            # The fan-out tests' policy: quick retries, three attempts.
            policy=FAN.stages[0].policy,
        ),
    ),
)


@pytest.fixture(autouse=True)
def stream_workflow(settings):
    settings.PIPELINE_LEASE_SECONDS = 1.0
    workflow_register(LIVE)
    for shared in (given, script, rounds_seen, done_by):
        shared.clear()
    faults.clear()
    on_unit.clear()


def give(*numbers: int) -> Callable[[Run], None]:
    return lambda run: given.extend(numbers)


def seal(run: Run) -> None:
    stream_seal(run.pk, STREAM)


def idle(rounds: int) -> list[Callable[[Run], None]]:
    return [lambda run: None] * rounds


def stream_run(**extra: object) -> Run:
    run = store.run_create(workflow=LIVE, subject="stream", input=extra)
    return executor.run_execute_inline(run, worker="coordinator")


def stage_of(run: Run) -> Stage:
    return Stage.objects.get(run=run, name=STREAM.name)


def test_units_given_after_the_workers_went_idle_are_done_and_the_stage_ends_at_the_seal():
    script.extend([give(0, 1), *idle(8), give(2), *idle(8), give(3, 4), *idle(3), seal])

    run = stream_run()

    assert run.status == RunStatus.SUCCEEDED
    assert stage_output(run, STREAM).squares == [0, 1, 4, 9, 16]
    assert Counter(key for key, _ in done_by) == {f"n:{n}": 1 for n in range(5)}
    # Not a round more than needed: the stage did not end before the seal, and ended after it.
    assert rounds_seen.count(True) >= 1 and rounds_seen[:-1].count(False) >= 20
    stage = stage_of(run)
    assert (stage.progress_done, stage.progress_total) == (5, 5)
    assert [u.index for u in Unit.objects.filter(stage=stage)] == [0, 1, 2, 3, 4]


def test_a_stage_sealed_before_it_opened_does_what_it_was_given_and_ends():
    run = store.run_create(workflow=LIVE, subject="stream", input={})
    given.extend([5, 6])

    assert stream_seal(run.pk, STREAM) is True
    assert stream_seal(run.pk, STREAM) is False  # a second seal changes nothing
    run = executor.run_execute_inline(run, worker="coordinator")

    assert run.status == RunStatus.SUCCEEDED
    assert stage_output(run, STREAM).squares == [25, 36]


def test_sealing_while_units_run_waits_for_them():
    def seal_while_running(unit: UnitContext) -> None:
        # The seal arrives while this unit is being done: it must still be in the output.
        seal(Run.objects.get(id=unit.claim.run_id))

    on_unit["n:2"] = seal_while_running
    script.extend([give(0, 1, 2)])

    run = stream_run(unit_seconds=0.2)

    assert run.status == RunStatus.SUCCEEDED
    assert stage_output(run, STREAM).squares == [0, 1, 4]


def test_a_unit_lost_mid_stream_is_taken_again_alone_and_the_stream_goes_on():
    ghost: list[store.UnitClaim] = []

    def a_worker_takes_the_next_and_dies(unit: UnitContext) -> None:
        claim = store.unit_claim(stage_id=unit.claim.stage_id, worker="dead-worker")
        assert claim is not None
        ghost.append(claim)

    on_unit["n:0"] = a_worker_takes_the_next_and_dies
    script.extend([give(0, 1), *idle(2), give(2), *idle(2), seal])

    run = stream_run()

    assert run.status == RunStatus.SUCCEEDED
    assert stage_output(run, STREAM).squares == [0, 1, 4]
    lost = Unit.objects.get(stage__run=run, key=ghost[0].key)
    assert (lost.key, lost.tries, lost.worker) == ("n:1", 2, "coordinator")
    assert stage_of(run).attempt_count == 1
    assert store.unit_complete(ghost[0], value=-1, seconds=0) is False


def test_a_later_attempt_asks_the_stream_from_the_start_and_keeps_what_was_done():
    faults["n:2"] = ["transient"]
    script.extend([give(0, 1, 2), *idle(4), give(3), *idle(4), seal])

    run = stream_run()

    assert run.status == RunStatus.SUCCEEDED
    assert stage_output(run, STREAM).squares == [0, 1, 4, 9]
    stage = stage_of(run)
    assert stage.attempt_count == 2
    # The seal survived the failed attempt, and only the failed unit was done again.
    assert stage.input_sealed_at is not None
    assert Counter(key for key, _ in done_by) == {"n:0": 1, "n:1": 1, "n:2": 2, "n:3": 1}


def test_a_cancel_while_the_stream_is_open_stops_it_and_nothing_more_is_done():
    def cancel(run: Run) -> None:
        run_cancel(run=run, operator=Operator(user=None, label="test"), reason="withdrawn")

    script.extend([give(0), *idle(4), cancel, give(1, 2), *idle(20)])

    run = stream_run()

    assert run.status == RunStatus.CANCELLED
    assert stage_of(run).status == StageStatus.CANCELLED
    assert [key for key, _ in done_by] == ["n:0"]
    # The source was not asked for long after the cancel: the lease check stopped the attempt.
    assert len(rounds_seen) < 4 + 2 + 20


def test_a_source_that_rewrites_units_it_gave_fails_its_attempt():
    def rewrite(run: Run) -> None:
        given[0] = 99

    script.extend([give(0, 1), *idle(2), rewrite, *idle(2), seal])

    run = stream_run()

    stage = stage_of(run)
    first = stage.attempts.get(number=1)
    assert first.status == "failed"
    assert "changed units it had already given" in first.error_message
    # The next attempt asked again from the start and took the list as it now is.
    assert run.status == RunStatus.SUCCEEDED
    assert stage_output(run, STREAM).squares == [99 * 99, 1]
