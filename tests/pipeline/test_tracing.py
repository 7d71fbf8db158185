"""Traces: a real visit through the pipeline, inline, with the model over loopback HTTP; its
spans caught by the SDK's in-memory exporter (or by a loopback OTLP collector) and checked
against the attempts and the token ledger, and for the visit's words."""

from __future__ import annotations

import multiprocessing
import re
import threading
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from pipeline.core import store, tracing
from pipeline.core.models import Attempt, AttemptStatus, LLMCall, RunStatus
from tests.conftest import SHORT_VISIT
from tests.fakes.loopback import LoopbackHandler, LoopbackServer
from visits.models import Visit
from visits.schemas import TranscribeOutput
from visits.services import visit_create, visit_start
from visits.speech.transcription import transcript_load

# Real commits: the heartbeat thread uses its own connection and must see the stage rows.
pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "gpt-4o-mini"  # what the llm_server fixture configures


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The engine's spans, kept in memory; the engine goes back to the no-op tracer after."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.tracer_use(provider)
    yield exporter
    tracing.tracer_use(None)
    provider.shutdown()


def run_visit(clinician) -> Visit:
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit, inline=True)
    visit.refresh_from_db()
    return visit


def attempt_spans(finished: tuple[ReadableSpan, ...]) -> dict[int, ReadableSpan]:
    """The attempt spans by attempt id."""
    return {
        span.attributes["pipeline.attempt.id"]: span
        for span in finished
        if span.name.startswith("stage ")
    }


def llm_spans(finished: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    return sorted((s for s in finished if s.name.startswith("chat ")), key=lambda s: s.start_time)


def parent_attempt(span: ReadableSpan, by_attempt: dict[int, ReadableSpan]) -> int:
    """The id of the attempt whose span is `span`'s parent (same trace)."""
    assert span.parent is not None
    (attempt_id,) = [
        attempt_id
        for attempt_id, attempt in by_attempt.items()
        if attempt.context.span_id == span.parent.span_id
        and attempt.context.trace_id == span.context.trace_id
    ]
    return attempt_id


def assert_one_span_per_attempt(visit: Visit, finished: tuple[ReadableSpan, ...]) -> None:
    by_attempt = attempt_spans(finished)
    attempts = Attempt.objects.filter(stage__run_id=visit.current_run_id).select_related(
        "stage__run"
    )
    assert len([s for s in finished if s.name.startswith("stage ")]) == len(attempts) > 0
    assert set(by_attempt) == {attempt.id for attempt in attempts}
    for attempt in attempts:
        span = by_attempt[attempt.id]
        assert span.name == f"stage {attempt.stage.name}"
        assert span.kind == SpanKind.INTERNAL
        assert span.parent is None  # each attempt is a trace of its own
        assert dict(span.attributes or {}) == {  # and nothing else: no subject, no input
            "pipeline.workflow": attempt.stage.run.workflow,
            "pipeline.run.id": visit.current_run_id,
            "pipeline.stage.id": attempt.stage_id,
            "pipeline.stage.name": attempt.stage.name,
            "pipeline.attempt.id": attempt.id,
            "pipeline.attempt.number": attempt.number,
            "pipeline.worker": attempt.worker,
        } | ({"error.type": attempt.error_code} if attempt.status == AttemptStatus.FAILED else {})
        if attempt.status == AttemptStatus.SUCCEEDED:
            assert span.status.status_code == StatusCode.UNSET
        else:
            assert span.status.status_code == StatusCode.ERROR
            assert span.status.description == attempt.error_code
        assert span.events == ()  # no exception recorded: its message may quote a transcript


def assert_model_calls_match_the_ledger(
    visit: Visit, finished: tuple[ReadableSpan, ...], settings
) -> None:
    """Every model call span is a CLIENT child of its attempt's span; the answered ones carry
    the tokens and cost of their ledger rows, in order, and the memo hits what they saved."""
    by_attempt = attempt_spans(finished)
    calls = llm_spans(finished)
    assert calls
    sent: dict[int, list[ReadableSpan]] = {}
    for span in calls:
        attributes = span.attributes or {}
        assert span.name == f"chat {MODEL}"
        assert span.kind == SpanKind.CLIENT
        assert {key: attributes[key] for key in _REQUEST_ATTRIBUTES} == {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.system": "openai",
            "gen_ai.request.model": MODEL,
            "gen_ai.request.max_tokens": settings.LLM_MAX_OUTPUT_TOKENS,
        }
        if span.status.status_code == StatusCode.UNSET and not attributes["pipeline.llm.memo_hit"]:
            sent.setdefault(parent_attempt(span, by_attempt), []).append(span)
    rows = LLMCall.objects.filter(stage__run_id=visit.current_run_id).order_by("id")
    assert {row.attempt_id for row in rows} == set(sent)
    for attempt_id, answered in sent.items():
        ledger = [row for row in rows if row.attempt_id == attempt_id]
        assert [_usage(span) for span in answered] == [
            (row.model, row.input_tokens, row.output_tokens, float(row.cost_usd)) for row in ledger
        ]
    for span in calls:
        assert parent_attempt(span, by_attempt) in by_attempt


_REQUEST_ATTRIBUTES = (
    "gen_ai.operation.name",
    "gen_ai.provider.name",
    "gen_ai.system",
    "gen_ai.request.model",
    "gen_ai.request.max_tokens",
)


def _usage(span: ReadableSpan) -> tuple[Any, ...]:
    attributes = span.attributes or {}
    return (
        attributes["gen_ai.response.model"],
        attributes["gen_ai.usage.input_tokens"],
        attributes["gen_ai.usage.output_tokens"],
        attributes["pipeline.llm.cost_usd"],
    )


def assert_no_word_of_the_visit(visit: Visit, finished: tuple[ReadableSpan, ...]) -> None:
    """No transcript word in any span: names, attributes, status, events, resource."""
    transcribed = visit.current_run.stages.get(name="transcribe").output
    transcript = transcript_load(TranscribeOutput.model_validate(transcribed))
    words = set(re.findall(r"[a-z]{5,}", " ".join(s.text for s in transcript.segments).lower()))
    text = "\n".join(span.to_json() for span in finished).lower()
    assert words and not [word for word in words if re.search(rf"\b{word}\b", text)]


# --- a visit, traced ------------------------------------------------------------------------


def test_a_visit_has_a_span_per_attempt_and_a_child_per_model_call(
    spans, clinician, llm_server, settings
):
    visit = run_visit(clinician)
    finished = spans.get_finished_spans()

    assert visit.current_run.status == RunStatus.SUCCEEDED
    assert {s.name for s in finished} == {
        "stage ingest",
        "stage transcribe",
        "stage summarize",
        "stage note",
        f"chat {MODEL}",
    }
    assert_one_span_per_attempt(visit, finished)
    assert_model_calls_match_the_ledger(visit, finished, settings)
    by_attempt = attempt_spans(finished)
    stages_called = {by_attempt[parent_attempt(s, by_attempt)].name for s in llm_spans(finished)}
    assert stages_called == {"stage summarize", "stage note"}
    assert not [s for s in llm_spans(finished) if s.attributes["pipeline.llm.memo_hit"]]
    assert_no_word_of_the_visit(visit, finished)


def test_a_failed_attempt_is_an_error_span_and_its_retry_marks_the_memo_hit(
    spans, clinician, llm_server, settings
):
    """Attempt 1 of summarize gets a (malformed) answer, then its repair request hits a 500:
    its span and the repair's are errors. Attempt 2 takes the first answer from the ledger
    (a memo hit: nothing used, its tokens saved) and sends only the repair."""
    llm_server.script("malformed", "500")

    visit = run_visit(clinician)
    finished = spans.get_finished_spans()

    assert visit.current_run.status == RunStatus.SUCCEEDED
    assert_one_span_per_attempt(visit, finished)
    assert_model_calls_match_the_ledger(visit, finished, settings)
    by_attempt = attempt_spans(finished)
    first, second = Attempt.objects.filter(
        stage__run_id=visit.current_run_id, stage__name="summarize"
    ).order_by("number")
    assert by_attempt[first.id].status.status_code == StatusCode.ERROR
    assert by_attempt[first.id].status.description == "llm_http_500"
    assert by_attempt[first.id].attributes["error.type"] == "llm_http_500"
    # The failed attempt's span ends as it fails, before its worker waits out the backoff.
    assert by_attempt[first.id].end_time <= by_attempt[second.id].start_time

    def children(attempt: Attempt) -> list[ReadableSpan]:
        return [s for s in llm_spans(finished) if parent_attempt(s, by_attempt) == attempt.id]

    answered, refused = children(first)
    assert answered.attributes["pipeline.llm.memo_hit"] is False
    assert (refused.status.status_code, refused.status.description) == (
        StatusCode.ERROR,
        "llm_http_500",
    )
    assert refused.attributes["error.type"] == "llm_http_500"
    assert "gen_ai.usage.input_tokens" not in refused.attributes
    assert refused.events == ()
    reused, repaired = children(second)
    (memo,) = LLMCall.objects.filter(attempt=first)
    assert dict(reused.attributes or {}) == {
        **{key: reused.attributes[key] for key in _REQUEST_ATTRIBUTES},
        "gen_ai.usage.input_tokens": 0,
        "gen_ai.usage.output_tokens": 0,
        "pipeline.llm.cost_usd": 0.0,
        "pipeline.llm.memo_hit": True,
        "pipeline.llm.saved_input_tokens": memo.input_tokens,
        "pipeline.llm.saved_output_tokens": memo.output_tokens,
        "pipeline.llm.saved_cost_usd": float(memo.cost_usd),
    }
    assert memo.input_tokens > 0 and memo.cost_usd > Decimal(0)
    assert repaired.attributes["pipeline.llm.memo_hit"] is False
    assert repaired.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert_no_word_of_the_visit(visit, finished)


# --- set-up ---------------------------------------------------------------------------------


def a_claim(**changes: Any) -> store.Claim:
    now = timezone.now()
    fields: dict[str, Any] = {
        "stage_id": 7,
        "run_id": 3,
        "workflow": "visit",
        "stage_name": "summarize",
        "position": 2,
        "attempt_id": 11,
        "attempt_number": 1,
        "worker": "host:1",
        "started_at": now,
        "deadline": now + timedelta(minutes=5),
        "run_input": {},
        "subject": "visit:1",
    }
    return store.Claim(**(fields | changes))


@pytest.fixture
def process_tracing(monkeypatch) -> Iterator[None]:
    """`tracing_setup` as a fresh process runs it; this process's state is put back after."""
    monkeypatch.setattr(tracing, "_provider", None)
    monkeypatch.setattr(tracing, "_tracer", tracing._tracer)
    tracing.tracer_use(None)
    yield
    if tracing._provider is not None:
        tracing._provider.shutdown()


@pytest.mark.django_db(transaction=False)
def test_without_an_endpoint_nothing_is_set_up(process_tracing, settings):
    settings.OTEL_EXPORTER_OTLP_ENDPOINT = ""

    assert tracing.tracing_setup() is None

    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    with tracing.attempt_span(a_claim()) as attempt, tracing.llm_span(MODEL, max_tokens=9) as call:
        assert not attempt.is_recording() and not call.span.is_recording()
        assert not attempt.get_span_context().is_valid
        tracing.attempt_failed(RuntimeError("nothing to mark"))


class _Collector:
    """A loopback OTLP/HTTP collector: keeps every POST, answers 200."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, str, bytes]] = []
        self.lock = threading.Lock()

    def spans(self) -> list[tuple[dict[str, Any], str, dict[str, Any]]]:
        """(resource attributes, span name, span attributes) of every span received."""
        found = []
        with self.lock:
            posts = list(self.posts)
        for path, content_type, body in posts:
            assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                resource = _values(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    assert scope_spans.scope.name == "pipeline"
                    found += [(resource, s.name, _values(s.attributes)) for s in scope_spans.spans]
        return found


def _values(attributes: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in attributes}


class _CollectorHandler(LoopbackHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.fake.lock:
            self.server.fake.posts.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def collector(settings, process_tracing) -> Iterator[_Collector]:
    """The collector, with this process set up to send it spans as OTEL_EXPORTER_OTLP_ENDPOINT."""
    fake = _Collector()
    server = LoopbackServer(fake, _CollectorHandler)
    server.serve_in_background()
    settings.OTEL_EXPORTER_OTLP_ENDPOINT = f"http://127.0.0.1:{server.server_address[1]}/"
    settings.OTEL_SERVICE_NAME = "visit-pipeline-test"
    yield fake
    server.stop()


def test_spans_reach_a_collector_over_otlp_http(collector, clinician, llm_server):
    provider = tracing.tracing_setup()
    assert provider is not None and tracing.tracing_setup() is provider  # once per process

    visit = run_visit(clinician)
    assert provider.force_flush()

    received = collector.spans()
    assert {resource["service.name"] for resource, _, _ in received} == {"visit-pipeline-test"}
    stages = {
        attributes["pipeline.attempt.id"]: name
        for _, name, attributes in received
        if name.startswith("stage ")
    }
    attempts = Attempt.objects.filter(stage__run_id=visit.current_run_id)
    assert stages == {a.id: f"stage {a.stage.name}" for a in attempts.select_related("stage")}
    model_calls = [attributes for _, name, attributes in received if name == f"chat {MODEL}"]
    rows = LLMCall.objects.filter(stage__run_id=visit.current_run_id)
    assert sorted(c["gen_ai.usage.input_tokens"] for c in model_calls) == sorted(
        row.input_tokens for row in rows
    )


def _make_a_span_and_exit() -> None:
    with tracing.attempt_span(a_claim(worker="forked")):
        pass


def test_a_forked_worker_sends_its_spans_as_it_exits(collector):
    """django-q2 forks its workers from the process that set tracing up, and they end by
    os._exit, which skips the atexit flush: the worker's spans are sent before it is gone."""
    assert tracing.tracing_setup() is not None

    worker = multiprocessing.get_context("fork").Process(target=_make_a_span_and_exit)
    worker.start()
    worker.join(timeout=20)

    assert worker.exitcode == 0
    ((resource, name, attributes),) = collector.spans()
    assert (name, attributes["pipeline.worker"]) == ("stage summarize", "forked")
    assert resource["service.name"] == "visit-pipeline-test"
