"""The fake LLM server, driven through the real ``openai`` SDK as the product drives it."""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Iterator

import openai
import pydantic
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from visits.schemas import ClinicalSummary, PostVisitNote

from .llm_server import HTTP_FAULTS, FakeLLMServer, request_digest


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(seed=7, timeout_seconds=3.0) as fake:
        yield fake


@pytest.fixture
def client(server: FakeLLMServer) -> Iterator[OpenAI]:
    with OpenAI(api_key="test", base_url=server.base_url, max_retries=0, timeout=1.0) as sdk:
        yield sdk


def ask(client: OpenAI, text: str = "hello") -> str:
    """Send one request; return its content, or the fault the SDK saw."""
    try:
        completion = client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": text}]
        )
    except openai.APITimeoutError:
        return "timeout"
    except openai.APIConnectionError:
        return "disconnect"
    except openai.APIStatusError as exc:
        return str(exc.status_code)
    return completion.choices[0].message.content or ""


@pytest.mark.parametrize("schema", [ClinicalSummary, PostVisitNote])
def test_default_answer_parses_as_the_products_schemas_and_is_billed(
    server: FakeLLMServer, client: OpenAI, schema: type[pydantic.BaseModel]
) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Summarise."}]
    completion = client.chat.completions.parse(
        model="gpt-test", messages=messages, response_format=schema
    )

    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, schema)
    assert '"stub"' in (completion.choices[0].message.content or "")  # ChaosLLMServer tags these
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == math.ceil(len(json.dumps(messages)) / 4)
    assert server.billed() == (usage.prompt_tokens, usage.completion_tokens)
    (record,) = server.requests
    assert (record.model, record.fault, record.answered) == ("gpt-test", "ok", True)
    assert (record.prompt_tokens, record.completion_tokens) == server.billed()


def test_default_answer_cites_segment_zero(server: FakeLLMServer, client: OpenAI) -> None:
    completion = client.chat.completions.parse(
        model="gpt-test",
        messages=[{"role": "user", "content": "x"}],
        response_format=ClinicalSummary,
    )
    summary = completion.choices[0].message.parsed
    assert summary is not None and summary.chief_complaint is not None
    assert summary.chief_complaint.segment_ids == [0]
    assert summary.medications[0].dose == "stub"


def test_responder_answers_with_the_request_in_hand(server: FakeLLMServer, client: OpenAI) -> None:
    assert ask(client) == "ok"  # no response_format
    server.responder = lambda body: "echo " + body["messages"][-1]["content"]
    assert ask(client, "abc") == "echo abc"
    assert server.requests[1].completion_tokens == math.ceil(len("echo abc") / 4)


@pytest.mark.parametrize("fault", sorted(HTTP_FAULTS))
def test_http_faults_reach_the_sdk_as_api_errors_and_are_not_billed(
    server: FakeLLMServer, client: OpenAI, fault: str
) -> None:
    server.script(fault)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "x"}]
        )

    assert caught.value.status_code == int(fault)
    assert caught.value.body == {
        "message": HTTP_FAULTS[fault][3],
        "type": HTTP_FAULTS[fault][1],
        "param": None,
        "code": HTTP_FAULTS[fault][2],
    }
    assert caught.value.response.headers.get("retry-after") == ("0" if fault == "429" else None)
    (record,) = server.requests
    assert (record.fault, record.answered, server.billed()) == (fault, False, (0, 0))


def test_timeout_and_disconnect_are_not_billed(server: FakeLLMServer, client: OpenAI) -> None:
    server.script("timeout", "disconnect")
    started = time.monotonic()
    assert ask(client) == "timeout"
    assert time.monotonic() - started < 2.5  # the client gave up; the server still holds it
    assert ask(client) == "disconnect"
    assert ask(client) == "ok"  # the same client carries on

    assert [(r.fault, r.answered) for r in server.requests] == [
        ("timeout", False),
        ("disconnect", False),
        ("ok", True),
    ]
    assert server.billed() == (server.requests[2].prompt_tokens, 1)


def test_malformed_answers_are_billed_and_do_not_parse(
    server: FakeLLMServer, client: OpenAI
) -> None:
    server.script("malformed", "malformed")
    with pytest.raises(pydantic.ValidationError):
        client.chat.completions.parse(
            model="gpt-test",
            messages=[{"role": "user", "content": "x"}],
            response_format=ClinicalSummary,
        )
    with pytest.raises(json.JSONDecodeError):
        json.loads(ask(client))

    assert [(r.fault, r.answered) for r in server.requests] == [("malformed", True)] * 2
    assert all(r.completion_tokens > 0 for r in server.requests)


def test_script_comes_first_then_seeded_rates(server: FakeLLMServer, client: OpenAI) -> None:
    server.set_rates(**{"503": 1.0})
    server.script("ok", "429")
    server.script("disconnect")
    assert [ask(client) for _ in range(5)] == ["ok", "429", "disconnect", "503", "503"]


def test_seeded_rates_repeat_after_reset(server: FakeLLMServer, client: OpenAI) -> None:
    server.set_rates(**{"429": 0.5})
    first = [ask(client) for _ in range(12)]
    assert {"ok", "429"} == set(first)

    server.reset()
    assert (server.requests, server.billed()) == ([], (0, 0))
    assert [ask(client) for _ in range(3)] == ["ok"] * 3  # the rates are gone too
    server.reset()
    server.set_rates(**{"429": 0.5})
    assert [ask(client) for _ in range(12)] == first


def test_unknown_faults_and_impossible_rates_are_refused(server: FakeLLMServer) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        server.script("ok", "418")
    with pytest.raises(ValueError, match="unknown fault"):
        server.set_rates(teapot=0.1)
    with pytest.raises(ValueError, match="more than 1"):
        server.set_rates(**{"429": 0.7, "500": 0.6})


def test_digest_is_sha256_of_the_canonical_request(server: FakeLLMServer, client: OpenAI) -> None:
    ask(client, "digest me")
    asked = {"model": "gpt-test", "messages": [{"role": "user", "content": "digest me"}]}
    canonical = json.dumps(
        {**asked, "response_format": None}, sort_keys=True, separators=(",", ":")
    )

    assert server.requests[0].digest == hashlib.sha256(canonical.encode()).hexdigest()
    assert request_digest(asked) == server.requests[0].digest


def test_retries_after_failures_are_not_answered_questions_sent_again(
    server: FakeLLMServer, client: OpenAI
) -> None:
    server.script("429", "500", "timeout", "disconnect")
    for _ in range(5):
        ask(client, "same")
    ask(client, "other")
    assert server.answered_sent_again() == []


def test_asking_again_after_an_answer_is_reported_once(
    server: FakeLLMServer, client: OpenAI
) -> None:
    server.script("malformed")
    ask(client, "first")
    ask(client, "first")  # after broken JSON: counted unless count_malformed=False
    digest = server.requests[0].digest
    assert server.answered_sent_again() == [digest]
    assert server.answered_sent_again(count_malformed=False) == []

    ask(client, "first")  # after a good answer: always counted, and listed once
    assert server.answered_sent_again(count_malformed=False) == [digest]
    assert server.answered_sent_again() == [digest]


def test_a_held_request_does_not_hold_up_the_others(server: FakeLLMServer, client: OpenAI) -> None:
    server.script("timeout")
    held = threading.Thread(target=ask, args=(client, "held"))
    held.start()
    time.sleep(0.2)  # let it reach the server first
    answers: list[str] = []
    started = time.monotonic()
    workers = [threading.Thread(target=lambda: answers.append(ask(client))) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    assert answers == ["ok"] * 8
    assert time.monotonic() - started < 0.9  # well before the held request's 1 s client timeout
    held.join()
    assert [r.fault for r in server.requests] == ["timeout", *["ok"] * 8]


def test_stopping_closes_kept_alive_connections() -> None:
    """A pooled connection must not reach a stopped server's ledger from a later test."""
    with FakeLLMServer() as server:
        sdk = OpenAI(api_key="test", base_url=server.base_url, max_retries=0, timeout=1.0)
        assert ask(sdk) == "ok"  # leaves a kept-alive connection in the SDK's pool
    with sdk:
        assert ask(sdk) == "disconnect"
    assert len(server.requests) == 1


def test_the_server_writes_nothing_to_the_terminal(
    server: FakeLLMServer, client: OpenAI, capfd: pytest.CaptureFixture[str]
) -> None:
    server.script("ok", "429", "disconnect", "malformed", "500")
    for _ in range(5):
        ask(client)
    assert capfd.readouterr() == ("", "")
