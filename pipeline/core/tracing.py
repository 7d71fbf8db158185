"""OpenTelemetry traces: a span per attempt, and a child span per model call inside it.

Spans go out over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set. When it is not, nothing is
set up and spans come from the API's default tracer, which records nothing (unless a process
installed a global provider of its own, e.g. under `opentelemetry-instrument`).

Spans carry ids, names, numbers and error codes, never what a subject contains: no prompt, no
answer, no error message (a provider's message may quote the request), and not the run's
subject either. The engine does not know what a domain uses as its subject, and spans leave
for other systems; the run id leads to it for whoever can read the database.

Model call spans follow OpenTelemetry's GenAI conventions (`chat {model}`, `gen_ai.*`), so that
Grafana Tempo, Langfuse or Phoenix show them as model calls with their tokens.
"""

from __future__ import annotations

import multiprocessing.util
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from typing import TYPE_CHECKING

from django.conf import settings
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from pipeline.core.errors import error_code

if TYPE_CHECKING:
    from pipeline.core.store import Claim

INSTRUMENTATION = "pipeline"
LLM_PROVIDER = "openai"  # the protocol the gateway speaks, whoever serves it

# The engine's spans are made with this tracer: the process's own provider's once
# `tracing_setup` built one, else the API's proxy, which makes non-recording spans.
_tracer: trace.Tracer = trace.get_tracer(INSTRUMENTATION)
_provider: TracerProvider | None = None


def tracer_use(provider: trace.TracerProvider | None) -> None:
    """Make the engine's spans with `provider` (a test's, with an in-memory exporter); None
    goes back to the API's default. The provider is kept here rather than installed as the
    API's global one, which can be set only once per process and never undone."""
    global _tracer
    _tracer = (provider or trace.get_tracer_provider()).get_tracer(INSTRUMENTATION)


def provider_build(*, endpoint: str, service_name: str) -> TracerProvider:
    """A provider that batches spans and posts them to `endpoint` + /v1/traces (OTLP/HTTP).
    The exporter reads its other settings from the standard variables itself (headers, e.g. a
    Langfuse key: OTEL_EXPORTER_OTLP_HEADERS; timeout; compression; certificates)."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    exporter = OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def tracing_setup() -> TracerProvider | None:
    """Build this process's provider if OTEL_EXPORTER_OTLP_ENDPOINT is set; once per process
    (`PipelineConfig.ready`, in the web server, the workers and every command alike).

    Forks: gunicorn's workers and django-q2's (always forked, from the process where Django
    started) inherit this provider. The SDK restarts the batch processor's export thread in the
    child after a fork and drops the spans copied from the parent (`os.register_at_fork`), and
    the parents (gunicorn's master, qcluster's sentinel) make no spans, so no export connection
    is shared across a fork either. What the SDK cannot do is flush at the end of a process
    started by multiprocessing: it leaves by `os._exit`, skipping the atexit hook where the
    provider flushes, and the spans of its last seconds would be lost. A multiprocessing
    finalizer, registered in each such child as it starts, flushes them instead. (No
    SimpleSpanProcessor: it would make every span wait for the collector, and a collector that
    is down would slow every attempt by the exporter's timeout.)"""
    global _provider
    endpoint = settings.OTEL_EXPORTER_OTLP_ENDPOINT
    if _provider is None and endpoint:
        _provider = provider_build(endpoint=endpoint, service_name=settings.OTEL_SERVICE_NAME)
        multiprocessing.util.register_after_fork(_provider, _flush_at_exit)
        tracer_use(_provider)
    return _provider


def _flush_at_exit(provider: TracerProvider) -> None:
    multiprocessing.util.Finalize(None, provider.shutdown, exitpriority=0)


# --- attempts -------------------------------------------------------------------------------


@contextmanager
def attempt_span(claim: Claim) -> Iterator[Span]:
    """The span of one attempt, current while it runs, so model calls become its children.
    `attempt_failed` marks and ends it; an exception escaping the attempt marks it too."""
    with _tracer.start_as_current_span(
        f"stage {claim.stage_name}",
        attributes={
            "pipeline.workflow": claim.workflow,
            "pipeline.run.id": claim.run_id,
            "pipeline.stage.id": claim.stage_id,
            "pipeline.stage.name": claim.stage_name,
            "pipeline.attempt.id": claim.attempt_id,
            "pipeline.attempt.number": claim.attempt_number,
            "pipeline.worker": claim.worker,
        },
        record_exception=False,  # an exception's message may quote what the stage read
        set_status_on_exception=False,
        end_on_exit=False,
    ) as span:
        try:
            yield span
        except BaseException as exc:
            _failed(span, exc)
            raise
        finally:
            if span.is_recording():  # not yet ended by attempt_failed
                span.end()


def attempt_failed(exc: BaseException) -> None:
    """Mark the running attempt's span failed, with the error's code (never its message), and
    end it: what its worker does next (wait out a short backoff) is not the attempt."""
    span = trace.get_current_span()
    _failed(span, exc)
    if span.is_recording():
        span.end()


def _failed(span: Span, exc: BaseException) -> None:
    if span.is_recording():
        code = error_code(exc)
        span.set_status(Status(StatusCode.ERROR, code))
        span.set_attribute("error.type", code)


# --- model calls ----------------------------------------------------------------------------


class LLMCallSpan:
    """What a model call's span learns as it goes: its answer's tokens and cost, or that the
    answer came from the memo and nothing was sent."""

    def __init__(self, span: Span) -> None:
        self.span = span

    def answered(
        self,
        *,
        response_model: str,
        input_tokens: int,
        output_tokens: int,
        cost_usd: Decimal,
        finish_reasons: Sequence[str],
    ) -> None:
        if self.span.is_recording():
            self.span.set_attributes(
                {
                    "gen_ai.response.model": response_model,
                    "gen_ai.response.finish_reasons": list(finish_reasons),
                    "gen_ai.usage.input_tokens": input_tokens,
                    "gen_ai.usage.output_tokens": output_tokens,
                    "pipeline.llm.cost_usd": float(cost_usd),
                    "pipeline.llm.memo_hit": False,
                }
            )

    def reused(self, *, input_tokens: int, output_tokens: int, cost_usd: Decimal) -> None:
        """The answer of an earlier attempt, from the ledger: nothing used, this much saved."""
        if self.span.is_recording():
            self.span.set_attributes(
                {
                    "gen_ai.usage.input_tokens": 0,
                    "gen_ai.usage.output_tokens": 0,
                    "pipeline.llm.cost_usd": 0.0,
                    "pipeline.llm.memo_hit": True,
                    "pipeline.llm.saved_input_tokens": input_tokens,
                    "pipeline.llm.saved_output_tokens": output_tokens,
                    "pipeline.llm.saved_cost_usd": float(cost_usd),
                }
            )


@contextmanager
def llm_span(model: str, *, max_tokens: int) -> Iterator[LLMCallSpan]:
    """The span of one chat-completions request (or its memo hit), a child of the attempt's.
    A failure is marked with the engine's error code (`llm_http_429`, `budget_exceeded`)."""
    with _tracer.start_as_current_span(
        f"chat {model}",
        kind=SpanKind.CLIENT,
        attributes={
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": LLM_PROVIDER,
            "gen_ai.system": LLM_PROVIDER,  # the name before gen_ai.provider.name
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": max_tokens,
        },
        record_exception=False,  # a provider's message may quote the request
        set_status_on_exception=False,
    ) as span:
        try:
            yield LLMCallSpan(span)
        except BaseException as exc:
            _failed(span, exc)
            raise
