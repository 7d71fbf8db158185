"""The openai path through the real pipeline: a real recording, real faster-whisper, and the
loopback chat-completions server with injected faults.

What these prove is the product's promise: the
engine owns retries (transient faults retry with backoff, permanent ones stop at once with a
message that says what to fix), and an answered model call is never paid for twice, neither
inside an attempt nor across attempts or a retry of the run."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from pipeline.core import store
from pipeline.core.models import Attempt, AttemptStatus, LLMCall, RunStatus, Stage, StageStatus
from tests.conftest import SHORT_VISIT
from tests.fakes.llm_server import FakeLLMServer, default_content
from visits.models import Visit
from visits.notes import offline
from visits.selectors import visit_status_document
from visits.services import visit_create, visit_rerun_from, visit_retry, visit_start

# Real commits: the heartbeat thread uses its own connection and must see the stage rows.
pytestmark = pytest.mark.django_db(transaction=True)

# gpt-4o-mini (the model the llm_server fixture configures) from fixtures/prices.json.
MINI_INPUT_USD_PER_MILLION = Decimal("0.15")
MINI_OUTPUT_USD_PER_MILLION = Decimal("0.60")


# --- helpers --------------------------------------------------------------------------------


def run_visit(clinician) -> Visit:
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit, inline=True)
    visit.refresh_from_db()
    visit.current_run.refresh_from_db()
    return visit


def stage_of(visit: Visit, name: str) -> Stage:
    return Stage.objects.get(run_id=visit.current_run_id, name=name)


def attempts_of(visit: Visit, name: str) -> list[Attempt]:
    return list(
        Attempt.objects.filter(stage__run_id=visit.current_run_id, stage__name=name).order_by(
            "number"
        )
    )


def calls_of(visit: Visit, name: str) -> list[LLMCall]:
    return list(
        LLMCall.objects.filter(stage__run_id=visit.current_run_id, stage__name=name)
        .select_related("attempt")
        .order_by("id")
    )


def schema_name(body: dict[str, Any]) -> str:
    return body["response_format"]["json_schema"]["name"]


def faults(server: FakeLLMServer) -> list[str]:
    return [record.fault for record in server.requests]


def expected_cost(server: FakeLLMServer) -> Decimal:
    """What the answered requests cost at gpt-4o-mini's list price, each call rounded to
    the ledger's 6 decimals as it is recorded."""
    total = Decimal(0)
    for record in server.requests:
        if record.answered:
            cost = (
                record.prompt_tokens * MINI_INPUT_USD_PER_MILLION
                + record.completion_tokens * MINI_OUTPUT_USD_PER_MILLION
            ) / Decimal(1_000_000)
            total += cost.quantize(Decimal("0.000001"))
    return total


def assert_usage_matches_billing(visit: Visit, server: FakeLLMServer) -> None:
    usage = visit_status_document(visit).model_dump(mode="json")["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == server.billed()
    ledger = LLMCall.objects.filter(stage__run__subject=visit.subject)
    assert sum(call.input_tokens for call in ledger) == server.billed()[0]
    assert sum(call.output_tokens for call in ledger) == server.billed()[1]
    assert usage["cost_usd"] == pytest.approx(float(expected_cost(server)), abs=1e-9)


def recording_responder(
    bodies: list[dict[str, Any]], answer: Callable[[dict[str, Any]], str] = default_content
) -> Callable[[dict[str, Any]], str]:
    """A responder that keeps every request body it answers (faults applied on top of it)."""

    def respond(body: dict[str, Any]) -> str:
        bodies.append(body)
        return answer(body)

    return respond


def summary_citing(segment_id: int) -> str:
    return json.dumps(
        {
            "chief_complaint": {"text": "headaches", "segment_ids": [segment_id]},
            "history": [],
            "medications": [],
            "allergies": [],
            "vitals": [],
            "assessment": [],
            "plan": [],
        }
    )


# --- the happy path -------------------------------------------------------------------------


def test_all_ok_bills_each_call_once_and_prices_it(clinician, llm_server):
    visit = run_visit(clinician)

    assert visit.current_run.status == RunStatus.SUCCEEDED
    for name in ("ingest", "transcribe", "summarize", "note"):
        assert stage_of(visit, name).status == StageStatus.SUCCEEDED
        assert [a.status for a in attempts_of(visit, name)] == [AttemptStatus.SUCCEEDED]

    assert faults(llm_server) == ["ok", "ok"]
    assert [r.model for r in llm_server.requests] == ["gpt-4o-mini", "gpt-4o-mini"]
    assert llm_server.answered_sent_again() == []

    calls = LLMCall.objects.filter(stage__run_id=visit.current_run_id).order_by("id")
    assert calls.count() == 2
    assert [c.stage.name for c in calls] == ["summarize", "note"]
    assert {c.model for c in calls} == {"gpt-4o-mini"}
    for call, record in zip(calls, llm_server.requests, strict=True):
        assert (call.input_tokens, call.output_tokens) == (
            record.prompt_tokens,
            record.completion_tokens,
        )
        assert call.input_tokens > 0 and call.output_tokens > 0

    # Each attempt carries its own call's tokens and cost.
    (summarize_attempt,) = attempts_of(visit, "summarize")
    (summarize_call,) = calls_of(visit, "summarize")
    assert summarize_call.attempt_id == summarize_attempt.id
    assert summarize_attempt.input_tokens == summarize_call.input_tokens
    assert summarize_attempt.cost_usd == summarize_call.cost_usd

    document = visit_status_document(visit).model_dump(mode="json")
    assert document["status"] == RunStatus.SUCCEEDED
    assert document["engine"] == "gpt-4o-mini"
    assert document["summary"] is not None and document["note"] is not None
    assert_usage_matches_billing(visit, llm_server)
    assert document["usage"]["cost_usd"] > 0
    assert sum(c.cost_usd for c in calls) == expected_cost(llm_server)


# --- transient faults: the engine retries, nothing answered is re-sent ----------------------


def test_transient_faults_are_retried_until_the_call_succeeds(clinician, llm_server):
    llm_server.script("429", "500", "timeout")

    visit = run_visit(clinician)

    assert visit.current_run.status == RunStatus.SUCCEEDED
    summarize = stage_of(visit, "summarize")
    assert summarize.status == StageStatus.SUCCEEDED
    assert summarize.attempt_count == 4
    attempts = attempts_of(visit, "summarize")
    assert [a.number for a in attempts] == [1, 2, 3, 4]
    assert [a.status for a in attempts] == [AttemptStatus.FAILED] * 3 + [AttemptStatus.SUCCEEDED]
    assert [a.error_code for a in attempts] == ["llm_http_429", "llm_http_500", "llm_timeout", ""]
    assert [a.error_message for a in attempts] == [
        "the LLM provider answered HTTP 429; will retry",
        "the LLM provider answered HTTP 500; will retry",
        "the LLM provider did not answer in time",
        "",
    ]
    # Failed tries were not billed and cost nothing.
    assert [(a.input_tokens, a.output_tokens) for a in attempts[:3]] == [(0, 0)] * 3
    assert [a.cost_usd for a in attempts[:3]] == [Decimal(0)] * 3

    # One request per attempt (no SDK retries), then one for the note.
    assert faults(llm_server) == ["429", "500", "timeout", "ok", "ok"]
    assert llm_server.answered_sent_again() == []
    # The stages before were not touched by the retries.
    for name in ("ingest", "transcribe", "note"):
        assert len(attempts_of(visit, name)) == 1
    assert LLMCall.objects.filter(stage__run_id=visit.current_run_id).count() == 2
    assert_usage_matches_billing(visit, llm_server)


def test_note_retry_does_not_resend_the_answered_summary(clinician, llm_server):
    llm_server.script("ok", "500")

    visit = run_visit(clinician)

    assert visit.current_run.status == RunStatus.SUCCEEDED
    assert len(attempts_of(visit, "summarize")) == 1
    note_attempts = attempts_of(visit, "note")
    assert [(a.status, a.error_code) for a in note_attempts] == [
        (AttemptStatus.FAILED, "llm_http_500"),
        (AttemptStatus.SUCCEEDED, ""),
    ]
    assert faults(llm_server) == ["ok", "500", "ok"]
    requests = llm_server.requests
    assert len({r.digest for r in requests}) == 2  # summarize once; the note twice (unanswered)
    assert requests[1].digest == requests[2].digest
    assert requests[0].digest != requests[1].digest
    assert llm_server.answered_sent_again() == []
    assert sum(r.answered for r in requests) == 2

    (note_call,) = calls_of(visit, "note")
    assert note_call.attempt.number == 2
    assert (note_attempts[0].input_tokens, note_attempts[0].output_tokens) == (0, 0)
    assert note_attempts[1].input_tokens == note_call.input_tokens
    assert LLMCall.objects.filter(stage__run_id=visit.current_run_id).count() == 2
    assert_usage_matches_billing(visit, llm_server)


def test_a_retry_reuses_an_answer_its_failed_attempt_already_got(clinician, llm_server):
    """Attempt 1 of summarize gets a (malformed) answer, then its repair request hits a 500.
    Attempt 2 must take the first answer from the ledger and send only the repair."""
    llm_server.script("malformed", "500")

    visit = run_visit(clinician)

    assert visit.current_run.status == RunStatus.SUCCEEDED
    attempts = attempts_of(visit, "summarize")
    assert [(a.status, a.error_code) for a in attempts] == [
        (AttemptStatus.FAILED, "llm_http_500"),
        (AttemptStatus.SUCCEEDED, ""),
    ]
    assert faults(llm_server) == ["malformed", "500", "ok", "ok"]
    first, repair, repair_again, _note = llm_server.requests
    assert repair.digest != first.digest
    assert repair_again.digest == repair.digest
    assert llm_server.answered_sent_again() == []

    calls = calls_of(visit, "summarize")
    assert [c.attempt.number for c in calls] == [1, 2]
    # The malformed answer was paid for by attempt 1, and stays on its books.
    assert attempts[0].input_tokens == first.prompt_tokens > 0
    assert attempts[1].input_tokens == repair_again.prompt_tokens
    assert_usage_matches_billing(visit, llm_server)


# --- permanent faults: stop at once, say what to fix ----------------------------------------


def test_refused_credentials_fail_the_run_at_once(clinician, llm_server):
    llm_server.script("401")

    visit = run_visit(clinician)

    run = visit.current_run
    assert run.status == RunStatus.FAILED
    summarize = stage_of(visit, "summarize")
    assert summarize.status == StageStatus.FAILED
    assert summarize.attempt_count == 1
    assert summarize.error_code == "llm_http_401"
    assert "OPENAI_API_KEY" in summarize.error_message
    assert "HTTP 401" in summarize.error_message
    assert "gave up" not in summarize.error_message  # not retried to exhaustion: refused once
    assert run.error == f"summarize: {summarize.error_message}"
    (attempt,) = attempts_of(visit, "summarize")
    assert (attempt.status, attempt.error_code) == (AttemptStatus.FAILED, "llm_http_401")

    note = stage_of(visit, "note")
    assert note.status == StageStatus.PENDING
    assert note.attempt_count == 0
    assert attempts_of(visit, "note") == []

    assert faults(llm_server) == ["401"]
    document = visit_status_document(visit).model_dump(mode="json")
    assert document["status"] == RunStatus.FAILED
    assert document["note"] is None
    assert document["summary"] is None
    assert LLMCall.objects.filter(stage__run_id=visit.current_run_id).count() == 0
    assert document["usage"]["input_tokens"] == 0


def test_malformed_json_once_is_repaired_in_the_same_attempt(clinician, llm_server):
    bodies: list[dict[str, Any]] = []
    llm_server.responder = recording_responder(bodies)
    llm_server.script("malformed")

    visit = run_visit(clinician)

    assert visit.current_run.status == RunStatus.SUCCEEDED
    (attempt,) = attempts_of(visit, "summarize")
    assert attempt.status == AttemptStatus.SUCCEEDED
    assert faults(llm_server) == ["malformed", "ok", "ok"]
    first, repair, _note = llm_server.requests
    assert repair.digest != first.digest
    assert llm_server.answered_sent_again() == []

    # The repair asks again with the bad answer and what was wrong with it.
    assert schema_name(bodies[1]) == "ClinicalSummary"
    assert bodies[1]["messages"][: len(bodies[0]["messages"])] == bodies[0]["messages"]
    assistant, complaint = bodies[1]["messages"][len(bodies[0]["messages"]) :]
    assert assistant["role"] == "assistant"
    with pytest.raises(ValueError):
        json.loads(assistant["content"])
    assert complaint["role"] == "user"
    assert complaint["content"].startswith("Your answer was not valid: ")
    assert "ClinicalSummary schema" in complaint["content"]

    calls = calls_of(visit, "summarize")
    assert len(calls) == 2
    assert calls[0].digest != calls[1].digest
    assert {c.attempt_id for c in calls} == {attempt.id}
    # Both answers were billed, both are on the attempt.
    assert attempt.input_tokens == first.prompt_tokens + repair.prompt_tokens
    assert_usage_matches_billing(visit, llm_server)


def test_malformed_json_twice_fails_permanently(clinician, llm_server):
    llm_server.script("malformed", "malformed")

    visit = run_visit(clinician)

    assert visit.current_run.status == RunStatus.FAILED
    summarize = stage_of(visit, "summarize")
    assert summarize.status == StageStatus.FAILED
    assert summarize.attempt_count == 1
    assert summarize.error_code == "output_invalid"
    assert summarize.error_message.startswith(
        "the model's ClinicalSummary was still invalid after 1 repair request(s): "
        "it does not match the ClinicalSummary schema"
    )
    (attempt,) = attempts_of(visit, "summarize")
    assert (attempt.status, attempt.error_code) == (AttemptStatus.FAILED, "output_invalid")

    assert faults(llm_server) == ["malformed", "malformed"]
    assert llm_server.answered_sent_again() == []
    assert stage_of(visit, "note").status == StageStatus.PENDING
    assert visit_status_document(visit).model_dump(mode="json")["note"] is None
    assert_usage_matches_billing(visit, llm_server)


def test_retrying_an_invalid_output_asks_for_one_more_repair_and_resends_nothing(
    clinician, llm_server
):
    """An admin's retry after `output_invalid` makes progress instead of failing again on the
    two memoized invalid answers: it sends one new repair request, and only that."""
    llm_server.script("malformed", "malformed")
    visit = run_visit(clinician)
    assert stage_of(visit, "summarize").error_code == "output_invalid"

    visit_retry(visit=visit, actor=None, reason="model had a bad night", inline=True)

    visit.refresh_from_db()
    assert visit.current_run.status == RunStatus.SUCCEEDED
    assert [a.status for a in attempts_of(visit, "summarize")] == ["failed", "succeeded"]
    # Third summarize request = second repair (carries both bad answers), then the note.
    assert faults(llm_server) == ["malformed", "malformed", "ok", "ok"]
    assert len({r.digest for r in llm_server.requests}) == 4
    assert llm_server.answered_sent_again() == []
    assert_usage_matches_billing(visit, llm_server)


def test_a_summary_citing_an_unknown_segment_is_repaired(clinician, llm_server):
    bodies: list[dict[str, Any]] = []

    def answer(body: dict[str, Any]) -> str:
        summaries = [b for b in bodies if schema_name(b) == "ClinicalSummary"]
        if schema_name(body) == "ClinicalSummary" and len(summaries) == 1:
            return summary_citing(999)
        if schema_name(body) == "ClinicalSummary":
            return summary_citing(0)
        return default_content(body)

    llm_server.responder = recording_responder(bodies, answer)

    visit = run_visit(clinician)

    assert visit.current_run.status == RunStatus.SUCCEEDED
    assert len(attempts_of(visit, "summarize")) == 1
    assert faults(llm_server) == ["ok", "ok", "ok"]
    assert [schema_name(b) for b in bodies] == [
        "ClinicalSummary",
        "ClinicalSummary",
        "PostVisitNote",
    ]
    complaint = bodies[1]["messages"][-1]["content"]
    assert "it cites transcript segment ids [999] that do not exist" in complaint
    summary = visit_status_document(visit).model_dump(mode="json")["summary"]
    assert summary["chief_complaint"]["segment_ids"] == [0]
    assert llm_server.answered_sent_again() == []


def test_a_summary_that_keeps_citing_an_unknown_segment_fails(clinician, llm_server):
    def answer(body: dict[str, Any]) -> str:
        if schema_name(body) == "ClinicalSummary":
            return summary_citing(999)
        return default_content(body)

    llm_server.responder = answer

    visit = run_visit(clinician)

    assert visit.current_run.status == RunStatus.FAILED
    summarize = stage_of(visit, "summarize")
    assert summarize.status == StageStatus.FAILED
    assert summarize.attempt_count == 1
    assert summarize.error_code == "output_invalid"
    segments = len(visit_status_document(visit).model_dump(mode="json")["transcript"]["segments"])
    assert summarize.error_message == (
        "the model's ClinicalSummary was still invalid after 1 repair request(s): "
        "it cites transcript segment ids [999] that do not exist "
        f"(valid ids are 0..{segments - 1}); retry the stage to ask for one more repair"
    )
    # The first answer and its repair: two different requests, nothing re-sent.
    assert faults(llm_server) == ["ok", "ok"]
    assert len({r.digest for r in llm_server.requests}) == 2
    assert llm_server.answered_sent_again() == []
    assert stage_of(visit, "note").attempt_count == 0


# --- retrying a failed run ------------------------------------------------------------------


def test_run_retry_resends_only_the_call_that_never_got_an_answer(clinician, llm_server):
    """The note's first call is answered (malformed), its repair is refused (401): the run
    fails. After the key is fixed, a retry of the run reuses the summary stage and the note's
    answered call, and sends only the repair."""
    llm_server.script("ok", "malformed", "401")

    visit = run_visit(clinician)

    assert visit.current_run.status == RunStatus.FAILED
    note = stage_of(visit, "note")
    assert (note.status, note.attempt_count, note.error_code) == (
        StageStatus.FAILED,
        1,
        "llm_http_401",
    )
    assert "OPENAI_API_KEY" in note.error_message
    assert faults(llm_server) == ["ok", "malformed", "401"]

    retried = store.stage_reopen_failed(run=visit.current_run)
    assert retried is not None and retried.name == "note"
    visit_start(visit=visit, inline=True)
    visit.current_run.refresh_from_db()

    assert visit.current_run.status == RunStatus.SUCCEEDED
    assert faults(llm_server) == ["ok", "malformed", "401", "ok"]
    summary_request, note_request, refused_repair, repair = llm_server.requests
    assert repair.digest == refused_repair.digest
    assert len({summary_request.digest, note_request.digest, repair.digest}) == 3
    assert llm_server.answered_sent_again() == []

    assert len(attempts_of(visit, "summarize")) == 1
    assert len(attempts_of(visit, "transcribe")) == 1
    note_attempts = attempts_of(visit, "note")
    assert [(a.number, a.status) for a in note_attempts] == [
        (1, AttemptStatus.FAILED),
        (2, AttemptStatus.SUCCEEDED),
    ]
    assert [c.attempt.number for c in calls_of(visit, "note")] == [1, 2]
    assert note_attempts[1].input_tokens == repair.prompt_tokens
    assert visit_status_document(visit).model_dump(mode="json")["note"] is not None
    assert_usage_matches_billing(visit, llm_server)


def test_token_budget_stops_the_next_llm_stage_permanently(clinician, llm_server, settings):
    settings.LLM_SUBJECT_TOKEN_BUDGET = 10

    visit = run_visit(clinician)

    assert visit.current_run.status == RunStatus.FAILED
    assert stage_of(visit, "summarize").status == StageStatus.SUCCEEDED
    note = stage_of(visit, "note")
    assert note.status == StageStatus.FAILED
    assert note.attempt_count == 1
    assert note.error_code == "budget_exceeded"
    spent = sum(llm_server.billed())
    assert spent > 10
    assert note.error_message == (
        f"visit:{visit.pk} has used {spent:,} LLM tokens over all its runs; its budget is 10 "
        "(LLM_SUBJECT_TOKEN_BUDGET). Raise the budget, or shorten the recording."
    )
    (attempt,) = attempts_of(visit, "note")
    assert (attempt.status, attempt.error_code) == (AttemptStatus.FAILED, "budget_exceeded")
    assert faults(llm_server) == ["ok"]  # the note's request was never sent
    assert visit_status_document(visit).model_dump(mode="json")["note"] is None


def test_the_visit_budget_counts_every_run_of_the_visit_re_runs_included(
    clinician, llm_server, settings
):
    visit = run_visit(clinician)
    spent = sum(llm_server.billed())
    assert visit.current_run.status == RunStatus.SUCCEEDED
    # What the first run spent is the whole budget: a re-run may not start afresh.
    settings.LLM_SUBJECT_TOKEN_BUDGET = spent

    visit_rerun_from(visit=visit, stage="summarize", actor=None, reason="new prompt", inline=True)

    visit.refresh_from_db()
    assert stage_of(visit, "summarize").error_code == "budget_exceeded"
    assert "over all its runs" in stage_of(visit, "summarize").error_message
    assert len(llm_server.requests) == 2  # the first run's two; the re-run sent none


def test_the_daily_budget_stops_new_calls_once_spent(clinician, llm_server, settings):
    settings.LLM_DAILY_BUDGET_USD = 0.000001  # the first answer spends it

    visit = run_visit(clinician)

    assert stage_of(visit, "summarize").status == StageStatus.SUCCEEDED
    note = stage_of(visit, "note")
    assert (note.status, note.error_code) == (StageStatus.FAILED, "budget_exceeded")
    assert note.error_message.startswith(
        "The organisation's LLM budget for today ($0.00, LLM_DAILY_BUDGET_USD) is spent"
    )
    assert faults(llm_server) == ["ok"]


def test_every_request_limits_the_length_of_its_answer(clinician, llm_server, settings):
    settings.LLM_MAX_OUTPUT_TOKENS = 1234

    run_visit(clinician)

    assert [r.max_tokens for r in llm_server.requests] == [1234, 1234]


# --- no key: the offline engine -------------------------------------------------------------


def test_offline_engine_runs_without_a_model(clinician, settings):
    assert settings.OPENAI_API_KEY == ""

    visit = run_visit(clinician)

    assert visit.current_run.status == RunStatus.SUCCEEDED
    calls = LLMCall.objects.filter(stage__run_id=visit.current_run_id).order_by("id")
    assert [c.stage.name for c in calls] == ["summarize", "note"]
    for call in calls:
        assert call.model == "offline-engine"
        assert (call.input_tokens, call.output_tokens, call.cost_usd) == (0, 0, Decimal(0))
    document = visit_status_document(visit).model_dump(mode="json")
    assert document["engine"] == offline.ENGINE_LABEL
    assert "offline" in document["engine"]
    assert document["note"] is not None
    assert document["usage"]["input_tokens"] == 0
    assert document["usage"]["output_tokens"] == 0
    assert document["usage"]["cost_usd"] == 0
    for name in ("summarize", "note"):
        assert len(attempts_of(visit, name)) == 1
