"""The LLM gateway's building blocks, engine level: how the openai SDK's errors are classified
(over real HTTP against the loopback fake), what a call costs on a given day, and the request
digest that memoizes answered calls."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI
from openai.lib import type_to_response_format_param
from pydantic import BaseModel

from pipeline.core.errors import PermanentError, TransientError
from pipeline.core.policy import is_retryable
from pipeline.llm.gateway import _client, classify_openai_error, request_digest
from tests.fakes.llm_server import FakeLLMServer

CLIENT_TIMEOUT_SECONDS = 1.0
MESSAGES = [
    {"role": "system", "content": "You summarise visits."},
    {"role": "user", "content": "Summarise: the patient came in for a check-up."},
]


# --- classify_openai_error over real HTTP ----------------------------------------------------


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(timeout_seconds=3.0) as server:
        yield server


@pytest.fixture
def client(fake: FakeLLMServer) -> Iterator[OpenAI]:
    fake.reset()
    sdk = OpenAI(
        api_key="test-key",
        base_url=fake.base_url,
        max_retries=0,
        timeout=CLIENT_TIMEOUT_SECONDS,
    )
    yield sdk
    sdk.close()


def _sdk_error(fake: FakeLLMServer, client: OpenAI, fault: str) -> openai.OpenAIError:
    """Send one real request that the fake answers with `fault`; return what the SDK raised."""
    fake.script(fault)
    with pytest.raises(openai.OpenAIError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    # Exactly one request reached the server: nothing retried behind our back.
    assert [r.fault for r in fake.requests] == [fault]
    return caught.value


@pytest.mark.parametrize("fault", ["401", "403"])
def test_refused_credentials_are_permanent_and_name_the_key(fake, client, fault):
    error = classify_openai_error(_sdk_error(fake, client, fault))

    assert type(error) is PermanentError
    assert not is_retryable(error)
    assert error.code == f"llm_http_{fault}"
    assert error.message == (
        f"the LLM provider refused our credentials (HTTP {fault}); "
        "check OPENAI_API_KEY and the key's access to LLM_MODEL"
    )


@pytest.mark.parametrize(
    ("fault", "provider_message", "kind"),
    [
        ("400", "Injected fault: bad request.", "invalid_request_error"),
        ("404", "Injected fault: model not found.", "invalid_request_error, model_not_found"),
        ("422", "Injected fault: unprocessable entity.", "invalid_request_error"),
    ],
)
def test_rejected_requests_are_permanent(fake, client, fault, provider_message, kind):
    error = classify_openai_error(_sdk_error(fake, client, fault))

    assert type(error) is PermanentError
    assert not is_retryable(error)
    assert error.code == f"llm_http_{fault}"
    # The provider's status, type and code, never its message: it may quote the request.
    assert error.message == (
        f"the LLM provider rejected the request (HTTP {fault}, {kind}); "
        "check LLM_MODEL and OPENAI_BASE_URL"
    )
    assert provider_message not in error.message


@pytest.mark.parametrize("fault", ["408", "409", "500", "503"])
def test_retryable_statuses_are_transient(fake, client, fault):
    error = classify_openai_error(_sdk_error(fake, client, fault))

    assert type(error) is TransientError
    assert is_retryable(error)
    assert error.code == f"llm_http_{fault}"
    assert error.message == f"the LLM provider answered HTTP {fault}; will retry"
    assert error.retry_after_seconds is None  # the fake sends no Retry-After for these


def test_rate_limit_is_transient_and_keeps_retry_after(fake, client):
    error = classify_openai_error(_sdk_error(fake, client, "429"))

    assert type(error) is TransientError
    assert is_retryable(error)
    assert error.code == "llm_http_429"
    assert error.message == "the LLM provider answered HTTP 429; will retry"
    assert error.retry_after_seconds == 0.0  # the fake answers 429 with "retry-after: 0"


def test_timeout_is_transient(fake, client):
    sdk_error = _sdk_error(fake, client, "timeout")
    assert isinstance(sdk_error, openai.APITimeoutError)

    error = classify_openai_error(sdk_error)

    assert type(error) is TransientError
    assert is_retryable(error)
    assert error.code == "llm_timeout"
    assert error.message == "the LLM provider did not answer in time"


def test_dropped_connection_is_transient(fake, client):
    sdk_error = _sdk_error(fake, client, "disconnect")
    assert isinstance(sdk_error, openai.APIConnectionError)
    assert not isinstance(sdk_error, openai.APITimeoutError)

    error = classify_openai_error(sdk_error)

    assert type(error) is TransientError
    assert is_retryable(error)
    assert error.code == "llm_connection"
    assert error.message == "could not reach the LLM provider"


def test_unexpected_client_error_is_permanent():
    error = classify_openai_error(openai.OpenAIError("the SDK is confused"))

    assert type(error) is PermanentError
    assert error.code == "llm_error"
    assert error.message == "unexpected LLM client error: the SDK is confused"


def test_gateway_client_never_retries_on_its_own(fake):
    """The engine owns retries: the SDK client the gateway uses has its own retries off, so a
    429 is one request on the wire, not several."""
    fake.reset()
    sdk = _client("test-key", fake.base_url, CLIENT_TIMEOUT_SECONDS)
    assert sdk.max_retries == 0
    fake.script("429", "500")
    for _ in range(2):
        with pytest.raises(openai.APIStatusError):
            sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert [r.fault for r in fake.requests] == ["429", "500"]


# --- request digest -------------------------------------------------------------------------


class _Answer(BaseModel):
    text: str
    segment_ids: list[int]


class _OtherAnswer(BaseModel):
    text: str
    segment_ids: list[str]


def test_request_digest_is_a_fixed_function_of_its_inputs():
    """The digest keys answers kept in the database: it must not change between processes,
    restarts or releases, or a retry would pay again for calls already answered."""
    response_format = {"type": "json_schema", "json_schema": {"name": "X", "schema": {}}}
    canonical = json.dumps(
        {"model": "gpt-4o-mini", "messages": MESSAGES, "response_format": response_format},
        sort_keys=True,
        separators=(",", ":"),
    )

    digest = request_digest("gpt-4o-mini", MESSAGES, response_format)

    assert digest == hashlib.sha256(canonical.encode()).hexdigest()
    # Pinned: changing the canonical form orphans every answer already in the ledger.
    assert digest == "9041abe825c3a743b2aaf3a2c2d9f9d2f922d3a21ecf1ea435d59aa7d8f494f9"


def test_request_digest_ignores_key_order_and_object_identity():
    response_format = type_to_response_format_param(_Answer)
    reordered_messages = [dict(reversed(list(message.items()))) for message in MESSAGES]
    reordered_format = json.loads(json.dumps(response_format))
    reordered_format = dict(reversed(list(reordered_format.items())))

    first = request_digest("gpt-4o-mini", MESSAGES, response_format)

    assert request_digest("gpt-4o-mini", json.loads(json.dumps(MESSAGES)), response_format) == (
        first
    )
    assert request_digest("gpt-4o-mini", reordered_messages, reordered_format) == first
    assert request_digest("gpt-4o-mini", MESSAGES, type_to_response_format_param(_Answer)) == first


def test_request_digest_changes_with_anything_that_decides_the_answer():
    response_format = type_to_response_format_param(_Answer)
    base = request_digest("gpt-4o-mini", MESSAGES, response_format)
    edited = [MESSAGES[0], {"role": "user", "content": MESSAGES[1]["content"] + " "}]
    repair = [*MESSAGES, {"role": "assistant", "content": "{}"}]

    variants = {
        "model": request_digest("gpt-4o", MESSAGES, response_format),
        "message text": request_digest("gpt-4o-mini", edited, response_format),
        "message order": request_digest("gpt-4o-mini", MESSAGES[::-1], response_format),
        "repair turn": request_digest("gpt-4o-mini", repair, response_format),
        "schema": request_digest(
            "gpt-4o-mini", MESSAGES, type_to_response_format_param(_OtherAnswer)
        ),
    }

    assert base not in variants.values()
    assert len(set(variants.values())) == len(variants)


def test_request_digest_matches_what_the_wire_request_asks_for(fake):
    """For the same model, messages and response_format the gateway's digest and the fake's
    (computed from the HTTP body the SDK actually sent) agree: the digest covers exactly what
    goes on the wire."""
    fake.reset()
    response_format = type_to_response_format_param(_Answer)
    sdk = OpenAI(api_key="k", base_url=fake.base_url, max_retries=0, timeout=1.0)
    try:
        sdk.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, response_format=response_format
        )
    finally:
        sdk.close()

    (recorded,) = fake.requests
    assert recorded.digest == request_digest("gpt-4o-mini", MESSAGES, response_format)
