"""Stages that fan out (`pipeline.core.units`): a stage's units are taken by every free worker, each
under its own lease; a failed or lost unit is done again alone, and a finished one never.

A small workflow of its own, run in this process: its stage adds up the squares of its units.
A second worker is a thread taking units as a queue message would (`units_work`)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from django.db import connection
from pydantic import BaseModel

from pipeline.core import executor, store
from pipeline.core.context import UnitContext
from pipeline.core.errors import PermanentError, TransientError
from pipeline.core.models import Checkpoint, Stage, Unit
from pipeline.core.policy import RetryPolicy
from pipeline.core.selectors import stage_output
from pipeline.core.states import FailureKind, RunStatus, StageStatus, UnitStatus
from pipeline.core.units import units_run, units_work
from pipeline.core.workflow import StageRef, StageSpec, Workflow, workflow_register
from tests.conftest import requires_postgres

# Heartbeats run on their own connections: the rows they fence on must be committed.
pytestmark = pytest.mark.django_db(transaction=True)


class Squares(BaseModel):
    squares: list[int]


# Which unit ran where and how often, across threads; and what a unit should do on a try.
done_by: list[tuple[str, str]] = []
faults: dict[str, list[str]] = {}
on_unit: dict[str, object] = {}


class BadNumber(PermanentError):
    code = "bad_number"


def square(unit: UnitContext) -> int:
    key = unit.claim.key
    done_by.append((key, unit.claim.worker))
    hook = on_unit.get(key)
    if callable(hook):
        hook(unit)
    fault = faults.get(key, [])
    if fault:
        kind = fault.pop(0)
        if kind == "transient":
            raise TransientError(f"unit {key} hiccuped", code="hiccup")
        raise BadNumber(f"unit {key} cannot be squared")
    time.sleep(float(unit.run_input.get("unit_seconds", 0)))
    unit.heartbeat()
    return int(unit.input["n"]) ** 2


def squares(ctx) -> Squares:
    count = int(ctx.input["count"])
    results = units_run(ctx, [(f"n:{n}", {"n": n}) for n in range(count)])
    return Squares(squares=[results[f"n:{n}"] for n in range(count)])


FAN = Workflow(
    name="fan-test",
    stages=(
        StageSpec(
            name="squares",
            run=squares,
            unit=square,
            output=Squares,
            policy=RetryPolicy(
                initial_interval_seconds=0.1,
                maximum_attempts=3,
                jitter=0,
                start_to_close_timeout_seconds=60,
            ),
        ),
    ),
)


@pytest.fixture(autouse=True)
def fan_workflow(settings):
    settings.PIPELINE_LEASE_SECONDS = 1.0
    workflow_register(FAN)
    done_by.clear()
    faults.clear()
    on_unit.clear()


def run_fan(count: int, **extra: object):
    run = store.run_create(workflow=FAN, subject="fan", input={"count": count, **extra})
    return executor.run_execute_inline(run, worker="coordinator")


def stage_of(run) -> Stage:
    return Stage.objects.get(run=run, name="squares")


def test_units_are_done_once_each_and_returned_in_the_order_asked():
    run = run_fan(7)

    assert run.status == RunStatus.SUCCEEDED
    assert stage_output(run, StageRef("squares", Squares)).squares == [n * n for n in range(7)]
    assert Counter(key for key, _ in done_by) == {f"n:{n}": 1 for n in range(7)}
    units = Unit.objects.filter(stage__run=run)
    assert [(u.index, u.status, u.tries) for u in units] == [
        (n, UnitStatus.DONE, 1) for n in range(7)
    ]
    # Each result is the stage's checkpoint, under the unit's key.
    kept = dict(Checkpoint.objects.filter(stage__run=run).values_list("key", "value"))
    assert kept == {f"n:{n}": n * n for n in range(7)}
    stage = stage_of(run)
    assert (stage.progress_done, stage.progress_total) == (7, 7)


@requires_postgres  # two writers at once: SQLite's in-memory test database locks the table
def test_a_second_worker_takes_units_while_the_attempt_takes_its_own():
    helper_done: list[int] = []

    def second_worker(unit: UnitContext) -> None:
        # Woken as a queue message would wake it, once the attempt has planned its units.
        if not helper_done:
            helper_done.append(0)
            thread = threading.Thread(target=work, args=(unit.claim.stage_id,))
            thread.start()
            threads.append(thread)

    def work(stage_id: int) -> None:
        try:
            helper_done.append(units_work(stage_id, worker="second-worker"))
        finally:
            connection.close()

    threads: list[threading.Thread] = []
    on_unit["n:0"] = second_worker
    run = run_fan(6, unit_seconds=0.3)
    for thread in threads:
        thread.join()

    assert run.status == RunStatus.SUCCEEDED
    assert stage_output(run, StageRef("squares", Squares)).squares == [n * n for n in range(6)]
    workers = Counter(worker for _, worker in done_by)
    assert set(workers) == {"coordinator", "second-worker"}
    assert workers["second-worker"] == helper_done[1] >= 1
    assert len(done_by) == 6  # no unit done twice


def test_a_failed_unit_fails_the_attempt_and_the_retry_redoes_only_it():
    faults["n:3"] = ["transient"]

    run = run_fan(5)

    assert run.status == RunStatus.SUCCEEDED
    assert stage_output(run, StageRef("squares", Squares)).squares == [0, 1, 4, 9, 16]
    stage = stage_of(run)
    assert stage.attempt_count == 2
    first = stage.attempts.get(number=1)
    assert (first.status, first.error_code) == ("failed", "hiccup")
    # Units 0-2 and 4 were kept from the first attempt; only unit 3 ran twice.
    assert Counter(key for key, _ in done_by) == {
        "n:0": 1,
        "n:1": 1,
        "n:2": 1,
        "n:3": 2,
        "n:4": 1,
    }


def test_a_unit_that_fails_permanently_fails_its_stage_with_its_code():
    faults["n:1"] = ["permanent"]

    run = run_fan(3)

    assert run.status == RunStatus.FAILED
    stage = stage_of(run)
    assert (stage.status, stage.failure_kind, stage.error_code) == (
        StageStatus.FAILED,
        FailureKind.PERMANENT,
        "bad_number",
    )
    assert stage.attempt_count == 1
    assert "unit n:1 cannot be squared" in stage.error_message


def test_a_unit_a_second_worker_failed_fails_the_attempt_by_its_kind():
    """The second worker's error reaches the attempt as its code and kind, not its object."""
    failed_by_helper: list[bool] = []

    def helper_takes_unit_2(unit: UnitContext) -> None:
        if failed_by_helper:
            return
        failed_by_helper.append(True)
        faults["n:2"] = ["permanent"]
        units_work(unit.claim.stage_id, worker="second-worker")

    on_unit["n:0"] = helper_takes_unit_2

    run = run_fan(4)

    stage = stage_of(run)
    assert (stage.status, stage.error_code) == (StageStatus.FAILED, "bad_number")
    assert "failed on second-worker" in stage.error_message
    assert ("n:2", "second-worker") in done_by


def test_a_unit_whose_worker_died_is_taken_again_alone_after_its_lease(settings):
    ghost: list[store.UnitClaim] = []

    def a_worker_takes_one_and_dies(unit: UnitContext) -> None:
        if not ghost:
            # Another worker takes the next unit and is never heard from again.
            claim = store.unit_claim(stage_id=unit.claim.stage_id, worker="dead-worker")
            assert claim is not None
            ghost.append(claim)

    on_unit["n:0"] = a_worker_takes_one_and_dies

    run = run_fan(3)

    assert run.status == RunStatus.SUCCEEDED
    assert stage_output(run, StageRef("squares", Squares)).squares == [0, 1, 4]
    lost = Unit.objects.get(stage__run=run, key=ghost[0].key)
    assert (lost.tries, lost.worker) == (2, "coordinator")
    assert stage_of(run).attempt_count == 1  # the stage was not retried for it
    # The dead worker, were it only frozen, can no longer keep a result.
    assert store.unit_complete(ghost[0], value=-1, seconds=0) is False
    assert (
        Checkpoint.objects.get(stage__run=run, key=ghost[0].key).value == ghost[0].input["n"] ** 2
    )


def test_workers_of_an_earlier_attempt_are_fenced_out():
    faults["n:1"] = ["transient"]
    stale: list[store.UnitClaim] = []

    def keep_a_claim_of_the_first_attempt(unit: UnitContext) -> None:
        if unit.claim.attempt_number == 1 and not stale:
            claim = store.unit_claim(stage_id=unit.claim.stage_id, worker="slow-worker")
            if claim is not None:
                stale.append(claim)

    on_unit["n:0"] = keep_a_claim_of_the_first_attempt

    run = run_fan(3)

    assert run.status == RunStatus.SUCCEEDED
    assert stale and stale[0].attempt_number == 1
    # The slow worker of attempt 1 finishes late: its result is not kept, attempt 2's is.
    assert store.unit_complete(stale[0], value=-1, seconds=0) is False
    assert -1 not in stage_output(run, StageRef("squares", Squares)).squares


def test_a_stage_with_no_units_returns_at_once():
    run = run_fan(0)

    assert run.status == RunStatus.SUCCEEDED
    assert stage_output(run, StageRef("squares", Squares)).squares == []
    assert not Unit.objects.exists()


@requires_postgres  # racing connections: SQLite's in-memory test database serializes them
def test_workers_racing_for_units_each_get_a_different_one_while_any_is_ready():
    run = store.run_create(workflow=FAN, subject="fan", input={"count": 0})
    claim = store.stage_claim(stage_id=stage_of(run).id, worker="coordinator")
    assert claim is not None
    store.units_plan(claim, [(n, f"n:{n}", {"n": n}) for n in range(48)])
    racers = 24
    start = threading.Barrier(racers)
    taken: list[str | None] = []

    def race() -> None:
        try:
            start.wait()
            unit = store.unit_claim(stage_id=claim.stage_id, worker="racer")
            taken.append(unit.key if unit else None)
        finally:
            connection.close()

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Nobody came back empty-handed while units were ready, and no unit was taken twice.
    assert None not in taken
    assert len(set(taken)) == racers
