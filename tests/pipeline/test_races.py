"""Races that only show up between hosts, attempts and connections, shown against the real engine:
hosts whose clocks disagree, two attempts answered the same LLM request, and a COMMIT whose
acknowledgement was lost on the way back."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import OperationalError, connection
from django.utils import timezone
from pydantic import BaseModel

from pipeline.core import executor, recovery, store
from pipeline.core.artifacts import artifact_path, attempt_dir
from pipeline.core.context import StageContext
from pipeline.core.errors import LeaseLost
from pipeline.core.leases import Heartbeat
from pipeline.core.models import Attempt, AttemptStatus, LLMCall, RunStatus, Stage, StageStatus
from pipeline.core.policy import RetryPolicy
from pipeline.core.selectors import usage_totals
from pipeline.core.workflow import StageSpec, Workflow, workflow_register
from pipeline.llm.gateway import LLMGateway
from pipeline.ops import dashboard

POLICY = RetryPolicy(initial_interval_seconds=1, maximum_attempts=3, jitter=0)


class Done(BaseModel):
    done: bool = True


def done(ctx: StageContext) -> Done:
    return Done()


def one_stage(name: str) -> Workflow:
    workflow = Workflow(name=name, stages=(StageSpec("only", done, POLICY, output=Done),))
    workflow_register(workflow)
    return workflow


def database_now() -> datetime:
    """The clock both hosts share: on a test machine the database's clock is the real one.
    Floored to the millisecond, the precision SQLite keeps its `Now()` at: a time it stored
    within the same millisecond is then never "before" this one."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


# --- 1. leases and deadlines run on the database's clock ------------------------------------


@pytest.fixture
def host_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[timedelta], None]:
    """Skew this host's clock (Django's `timezone.now`) by an offset, as a host whose clock
    drifted, or was stepped by NTP, would see it."""
    real_now = timezone.now

    def skew(offset: timedelta) -> None:
        monkeypatch.setattr(timezone, "now", lambda: real_now() + offset)

    return skew


@pytest.mark.django_db
def test_a_sweep_on_a_host_whose_clock_runs_ahead_leaves_a_live_lease_alone(host_clock):
    run = store.run_create(workflow=one_stage("t-skew-sweep"), subject="thing:1", input={})
    claim = store.stage_claim(stage_id=run.stages.get().id, worker="host-a")
    assert claim is not None

    host_clock(timedelta(hours=1))  # host b, an hour ahead, sweeps and is asked to run it
    assert recovery.leases_reap() == []
    assert store.stage_claim(stage_id=claim.stage_id, worker="host-b") is None

    stage = Stage.objects.get(id=claim.stage_id)
    assert (stage.status, stage.lease_owner, stage.attempt_count) == ("running", "host-a", 1)
    assert Attempt.objects.get(id=claim.attempt_id).status == AttemptStatus.RUNNING


@pytest.mark.django_db
def test_a_worker_whose_clock_jumps_ahead_keeps_its_lease_and_completes(host_clock):
    run = store.run_create(workflow=one_stage("t-skew-jump"), subject="thing:1", input={})
    claim = store.stage_claim(stage_id=run.stages.get().id, worker="w")
    assert claim is not None

    host_clock(timedelta(hours=1))  # NTP steps this host's clock mid-attempt
    store.stage_heartbeat(claim)  # not "timed out": the attempt is seconds old
    store.attempt_complete(claim, output={"done": True})

    assert Stage.objects.get(id=claim.stage_id).status == StageStatus.SUCCEEDED


@pytest.mark.django_db
def test_a_worker_whose_clock_runs_behind_cannot_keep_an_expired_lease(host_clock):
    run = store.run_create(workflow=one_stage("t-skew-behind"), subject="thing:1", input={})
    claim = store.stage_claim(stage_id=run.stages.get().id, worker="w")
    assert claim is not None
    Stage.objects.filter(id=claim.stage_id).update(
        lease_expires_at=database_now() - timedelta(seconds=1)
    )

    host_clock(-timedelta(hours=1))
    with pytest.raises(LeaseLost):
        store.stage_heartbeat(claim)
    with pytest.raises(LeaseLost):
        store.attempt_complete(claim, output={"done": True})
    assert Stage.objects.get(id=claim.stage_id).status == StageStatus.RUNNING


@pytest.mark.django_db
@pytest.mark.parametrize("offset_hours", [-1, 1])
def test_a_claim_on_a_skewed_host_leases_by_the_database_clock(host_clock, settings, offset_hours):
    settings.PIPELINE_LEASE_SECONDS = 30
    run = store.run_create(workflow=one_stage("t-skew-claim"), subject="thing:1", input={})

    host_clock(timedelta(hours=offset_hours))
    before = database_now()
    claim = store.stage_claim(stage_id=run.stages.get().id, worker="skewed")
    after = database_now()

    assert claim is not None  # a host behind still sees the stage as due
    lease = Stage.objects.get(id=claim.stage_id).lease_expires_at
    assert lease is not None
    assert before + timedelta(seconds=30) <= lease <= after + timedelta(seconds=30)
    started = Attempt.objects.get(id=claim.attempt_id).started_at
    assert before <= started <= after
    timeout = timedelta(seconds=POLICY.start_to_close_timeout_seconds)
    assert before + timeout <= claim.deadline <= after + timeout


# --- 2. two attempts answered the same request: both are billed, one answer is used ---------


class Answer(BaseModel):
    text: str


MESSAGES: list[Any] = [{"role": "user", "content": "Say something."}]


def ask(claim: store.Claim, answers: dict[str, Any]) -> None:
    """One attempt asking its question through the gateway, on its own thread and connection."""
    try:
        ctx = StageContext(claim, Heartbeat(claim))
        answers[claim.worker] = LLMGateway(ctx).complete(
            messages=MESSAGES, output_type=Answer, offline=lambda: Answer(text="offline")
        )
    except Exception as exc:  # the test reads it from `answers`
        answers[claim.worker] = exc
    finally:
        connection.close()


def wait_until(condition: Callable[[], bool], *, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.django_db(transaction=True)
def test_two_attempts_answered_the_same_request_both_are_billed_and_use_the_first_answer(
    llm_server, settings
):
    settings.LLM_REQUEST_TIMEOUT_SECONDS = 5.0
    answers: dict[str, Any] = {}
    # The provider answers neither request until both have arrived, and answers them
    # differently, so that which answer each attempt went on with can be told apart. The
    # second answer waits until the first is recorded: the two inserts then meet in the
    # ledger's constraint, not in the table lock of SQLite's in-memory test database (a
    # shared-cache one, which fails instead of waiting).
    arrived: list[int] = []
    both_asked = threading.Barrier(2, timeout=5)

    def responder(body: dict[str, Any]) -> str:
        arrived.append(len(arrived) + 1)
        number = arrived[-1]
        both_asked.wait()
        if number == 2:
            wait_until(lambda: "zombie" in answers)
        return json.dumps({"text": f"answer {number}"})

    llm_server.responder = responder
    run = store.run_create(workflow=one_stage("t-llm-race"), subject="thing:1", input={})
    stage_id = run.stages.get().id

    # The first attempt asks, then stalls past its lease while it waits for the answer; the
    # sweep takes the stage back and a second attempt asks the same question.
    zombie = store.stage_claim(stage_id=stage_id, worker="zombie")
    assert zombie is not None
    threads = [threading.Thread(target=ask, args=(zombie, answers))]
    threads[0].start()
    wait_until(lambda: arrived == [1])
    Stage.objects.filter(id=stage_id).update(lease_expires_at=database_now() - timedelta(seconds=1))
    assert [lost.worker for lost in recovery.leases_reap()] == ["zombie"]
    fresh = store.stage_claim(stage_id=stage_id, worker="fresh")
    assert fresh is not None
    threads.append(threading.Thread(target=ask, args=(fresh, answers)))
    threads[1].start()
    for thread in threads:
        thread.join(timeout=10)

    calls = list(LLMCall.objects.filter(stage_id=stage_id).order_by("id"))
    assert len(calls) == 2 and calls[0].digest == calls[1].digest, answers
    first, duplicate = calls
    assert (first.attempt_id, first.duplicate_of_id) == (zombie.attempt_id, None)
    assert (duplicate.attempt_id, duplicate.duplicate_of_id) == (fresh.attempt_id, first.id)
    # Both attempts go on with the answer recorded first.
    used = Answer(text="answer 1")
    assert answers == {"zombie": used, "fresh": used}
    # Both answers were billed, so both are in the ledger, each on the attempt that paid.
    for call in calls:
        attempt = Attempt.objects.get(id=call.attempt_id)
        assert (attempt.input_tokens, attempt.output_tokens, attempt.cost_usd) == (
            call.input_tokens,
            call.output_tokens,
            call.cost_usd,
        )
    spent = usage_totals(run_ids=[run.id])
    assert (spent.calls, (spent.input_tokens, spent.output_tokens)) == (2, llm_server.billed())
    assert spent.cost_usd == first.cost_usd + duplicate.cost_usd > 0
    [by_model] = dashboard.llm_spend_by_model(since=database_now() - timedelta(days=1))
    assert (by_model.calls, by_model.cost_usd) == (2, spent.cost_usd)

    # The answer is memoized once: a later attempt reuses it and asks nothing.
    llm_server.reset()
    Stage.objects.filter(id=stage_id).update(lease_expires_at=database_now() - timedelta(seconds=1))
    assert [lost.worker for lost in recovery.leases_reap()] == ["fresh"]
    third = store.stage_claim(stage_id=stage_id, worker="third")
    assert third is not None
    ask(third, answers)
    assert answers["third"] == used
    assert llm_server.requests == []


# --- 3. a COMMIT whose outcome the worker could not see -------------------------------------


class CommitFault:
    """Breaks the next COMMIT of this thread's connection once armed: after the database
    committed (`"after"`: the acknowledgement is lost) or before it (`"before"`)."""

    def __init__(self) -> None:
        self.armed: str | None = None

    def arm(self, when: str) -> None:
        self.armed = when

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        commit = connection._commit

        def failing_commit() -> None:
            when, self.armed = self.armed, None
            if when == "before":
                raise OperationalError("server closed the connection unexpectedly")
            commit()
            if when == "after":
                raise OperationalError("server closed the connection unexpectedly")

        monkeypatch.setattr(connection, "_commit", failing_commit)


COMMIT = CommitFault()


class Report(BaseModel):
    ref: str


def write_report(ctx: StageContext) -> Report:
    """A stage with a large output kept as an artifact; the first attempt's commit breaks."""
    with ctx.artifact_writer("report.txt", "w") as handle:
        handle.write(f"written by attempt {ctx.attempt_number}")
    if ctx.attempt_number == 1:
        COMMIT.arm(ctx.input["commit_fails"])
    return Report(ref=ctx.artifact_ref("report.txt"))


REPORT_FLOW = Workflow(
    name="t-report",
    stages=(
        StageSpec("report", write_report, POLICY, output=Report),
        StageSpec("last", done, POLICY, output=Done),
    ),
)


@pytest.fixture
def commit_fault(monkeypatch: pytest.MonkeyPatch) -> Iterator[CommitFault]:
    workflow_register(REPORT_FLOW)
    COMMIT.install(monkeypatch)
    yield COMMIT
    COMMIT.armed = None


@pytest.mark.django_db(transaction=True)
def test_a_commit_whose_acknowledgement_was_lost_keeps_the_artifacts_of_its_stage(commit_fault):
    run = store.run_create(workflow=REPORT_FLOW, subject="thing:1", input={"commit_fails": "after"})
    executor.stage_execute(run.stages.get(name="report").id)

    report = Stage.objects.get(run=run, name="report")
    assert (report.status, report.attempt_count) == (StageStatus.SUCCEEDED, 1)
    assert report.attempts.get().status == AttemptStatus.SUCCEEDED
    assert artifact_path(report.output["ref"]).read_text() == "written by attempt 1"
    # The worker went on as after any commit: the next stage ran inline.
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED


@pytest.mark.django_db(transaction=True)
def test_a_commit_that_did_not_happen_discards_the_artifacts_and_retries(commit_fault):
    run = store.run_create(
        workflow=REPORT_FLOW, subject="thing:1", input={"commit_fails": "before"}
    )
    executor.run_execute_inline(run)

    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED
    report = Stage.objects.get(run=run, name="report")
    attempts = list(report.attempts.order_by("number").values_list("status", "error_code"))
    assert attempts == [(AttemptStatus.FAILED, "OperationalError"), (AttemptStatus.SUCCEEDED, "")]
    assert not attempt_dir(run.id, "report", 1).exists()
    assert artifact_path(report.output["ref"]).read_text() == "written by attempt 2"


@pytest.mark.django_db(transaction=True)
def test_an_answer_whose_ledger_commit_was_not_acknowledged_is_recorded_once(
    llm_server, commit_fault
):
    run = store.run_create(workflow=one_stage("t-llm-ack"), subject="thing:1", input={})
    claim = store.stage_claim(stage_id=run.stages.get().id, worker="w")
    assert claim is not None

    commit_fault.arm("after")  # the ledger insert commits; the worker hears it failed
    answer = LLMGateway(StageContext(claim, Heartbeat(claim))).complete(
        messages=MESSAGES, output_type=Answer, offline=lambda: Answer(text="offline")
    )

    call = LLMCall.objects.get(stage_id=claim.stage_id)
    assert answer == Answer.model_validate_json(call.content)
    attempt = Attempt.objects.get(id=claim.attempt_id)
    billed = llm_server.billed()
    assert (call.input_tokens, call.output_tokens) == billed
    assert (attempt.input_tokens, attempt.output_tokens, attempt.cost_usd) == (
        *billed,
        call.cost_usd,
    )
