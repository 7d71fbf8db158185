"""Tests for the fault-injecting fake OpenAI server, driven through the real ``openai`` SDK."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import math
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import openai
import pydantic
import pytest
from openai import OpenAI

from .llm_server import FAULTS, HTTP_FAULTS, FakeLLMServer, malform, request_digest, schema_instance

REPO_ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [
    {"role": "system", "content": "You summarise visits."},
    {"role": "user", "content": "Summarise: the patient came in for a check-up."},
]


class Severity(StrEnum):
    low = "low"
    high = "high"


class Finding(pydantic.BaseModel):
    label: str
    minutes: list[int]
    note: str | None = None
    kind: Literal["symptom", "sign", "plan"]
    severity: Severity


class VisitSummary(pydantic.BaseModel):
    title: str
    findings: list[Finding]
    follow_up_days: int | None
    confidence: float
    urgent: bool


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(seed=7, timeout_seconds=3.0) as fake:
        yield fake


@pytest.fixture
def client(server: FakeLLMServer) -> Iterator[OpenAI]:
    sdk = OpenAI(api_key="test", base_url=server.base_url, max_retries=0, timeout=1.0)
    yield sdk
    sdk.close()


def _create(client: OpenAI, content: str = "hello") -> Any:
    return client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": content}]
    )


def _fault_of(client: OpenAI, content: str = "hello") -> str:
    """Make one request and classify what the SDK saw."""
    try:
        _create(client, content)
    except openai.APITimeoutError:
        return "timeout"
    except openai.APIConnectionError:
        return "disconnect"
    except openai.APIStatusError as exc:
        return str(exc.status_code)
    return "ok"


def _expected_prompt_tokens(messages: list[dict[str, str]]) -> int:
    return max(1, math.ceil(len(json.dumps(messages)) / 4))


# ---------------------------------------------------------------------------------------------
# Happy path
# ---------------------------------------------------------------------------------------------


def test_parse_returns_validated_nested_model_and_usage_matches_billing(
    server: FakeLLMServer, client: OpenAI
) -> None:
    completion = client.chat.completions.parse(
        model="gpt-test", messages=MESSAGES, response_format=VisitSummary
    )

    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, VisitSummary)
    assert len(parsed.findings) == 1
    finding = parsed.findings[0]
    assert isinstance(finding, Finding)
    assert finding.minutes == [0]
    assert finding.kind == "symptom"
    assert finding.severity is Severity.low
    assert finding.note == "stub"  # optional fields are filled, first non-null branch
    assert parsed.title == "stub"
    assert completion.model == "gpt-test"
    assert completion.choices[0].finish_reason == "stop"

    content = completion.choices[0].message.content
    assert content is not None
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == _expected_prompt_tokens(MESSAGES)
    assert usage.completion_tokens == max(1, math.ceil(len(content) / 4))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert server.billed() == (usage.prompt_tokens, usage.completion_tokens)

    (record,) = server.requests
    assert record.fault == "ok"
    assert record.answered is True
    assert record.model == "gpt-test"
    assert (record.prompt_tokens, record.completion_tokens) == server.billed()


def test_create_without_response_format_answers_ok(server: FakeLLMServer, client: OpenAI) -> None:
    completion = _create(client)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "ok"
    assert completion.choices[0].message.role == "assistant"
    assert server.billed() == (completion.usage.prompt_tokens, 1)


def test_custom_responder_receives_body(server: FakeLLMServer, client: OpenAI) -> None:
    seen: list[dict[str, Any]] = []

    def responder(body: dict[str, Any]) -> str:
        seen.append(body)
        return "custom " + body["messages"][-1]["content"]

    server.responder = responder
    completion = _create(client, "abc")
    assert completion.choices[0].message.content == "custom abc"
    assert seen[0]["model"] == "gpt-test"
    assert server.billed()[1] == max(1, math.ceil(len("custom abc") / 4))


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "exc_type"),
    [
        ("401", openai.AuthenticationError),
        ("403", openai.PermissionDeniedError),
        ("400", openai.BadRequestError),
        ("404", openai.NotFoundError),
        ("422", openai.UnprocessableEntityError),
        ("429", openai.RateLimitError),
        ("500", openai.InternalServerError),
        ("503", openai.InternalServerError),
        ("408", openai.APIStatusError),
        ("409", openai.APIStatusError),
    ],
)
def test_http_faults_map_to_sdk_exceptions(
    server: FakeLLMServer, client: OpenAI, fault: str, exc_type: type[Exception]
) -> None:
    server.script(fault)
    with pytest.raises(exc_type) as info:
        client.chat.completions.parse(
            model="gpt-test", messages=MESSAGES, response_format=VisitSummary
        )

    err = info.value
    assert isinstance(err, openai.APIStatusError)
    assert err.status_code == int(fault)
    assert isinstance(err.body, dict)
    assert err.body["message"] == HTTP_FAULTS[fault][3]
    assert err.body["type"] == HTTP_FAULTS[fault][1]
    assert "code" in err.body
    if fault == "429":
        assert err.response.headers["retry-after"] == "0"
    else:
        assert "retry-after" not in err.response.headers

    (record,) = server.requests
    assert record.fault == fault
    assert record.answered is False
    assert (record.prompt_tokens, record.completion_tokens) == (0, 0)
    assert server.billed() == (0, 0)


def test_timeout_fault_raises_api_timeout_error(server: FakeLLMServer, client: OpenAI) -> None:
    server.script("timeout")
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        _create(client)
    assert time.monotonic() - started < 2.5  # the client gave up; the server still holds it

    (record,) = server.requests
    assert (record.fault, record.answered) == ("timeout", False)
    assert server.billed() == (0, 0)
    # The same client carries on normally afterwards.
    assert _create(client).choices[0].message.content == "ok"


def test_disconnect_fault_raises_api_connection_error(
    server: FakeLLMServer, client: OpenAI
) -> None:
    server.script("disconnect")
    started = time.monotonic()
    with pytest.raises(openai.APIConnectionError) as info:
        _create(client)
    assert not isinstance(info.value, openai.APITimeoutError)
    assert time.monotonic() - started < 0.9
    (record,) = server.requests
    assert (record.fault, record.answered) == ("disconnect", False)
    assert server.billed() == (0, 0)


def test_malformed_fault_breaks_parse_and_create(server: FakeLLMServer, client: OpenAI) -> None:
    server.script("malformed", "malformed")
    with pytest.raises((pydantic.ValidationError, json.JSONDecodeError)):
        client.chat.completions.parse(
            model="gpt-test", messages=MESSAGES, response_format=VisitSummary
        )
    completion = client.chat.completions.create(
        model="gpt-test",
        messages=MESSAGES,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "VisitSummary", "schema": VisitSummary.model_json_schema()},
        },
    )
    content = completion.choices[0].message.content
    assert content
    with pytest.raises(json.JSONDecodeError):
        json.loads(content)

    records = server.requests
    assert [(r.fault, r.answered) for r in records] == [("malformed", True)] * 2
    assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 for r in records)
    assert server.billed() == (
        sum(r.prompt_tokens for r in records),
        sum(r.completion_tokens for r in records),
    )


def test_malform_never_returns_valid_json() -> None:
    for content in ["ok", "12345", "{}", "[1, 2]", '"stub"', json.dumps({"a": [1, 2, 3]}), ""]:
        with pytest.raises(json.JSONDecodeError):
            json.loads(malform(content))


# ---------------------------------------------------------------------------------------------
# Script and rates
# ---------------------------------------------------------------------------------------------


def test_script_order_is_honoured_then_falls_back_to_rates(
    server: FakeLLMServer, client: OpenAI
) -> None:
    server.set_rates(**{"503": 1.0})
    server.script("ok", "429", "disconnect", "404", "ok")
    seen = [_fault_of(client) for _ in range(7)]
    assert seen == ["ok", "429", "disconnect", "404", "ok", "503", "503"]
    assert [r.fault for r in server.requests] == seen

    server.set_rates()
    assert _fault_of(client) == "ok"


def test_script_appends_to_pending_faults(server: FakeLLMServer, client: OpenAI) -> None:
    server.script("500")
    server.script("429")
    assert [_fault_of(client) for _ in range(3)] == ["500", "429", "ok"]


def test_seeded_rates_are_reproducible() -> None:
    rates = {"429": 0.25, "500": 0.15, "malformed": 0.1, "400": 0.1}

    def run(seed: int) -> list[str]:
        with FakeLLMServer(seed=seed) as fake:
            fake.set_rates(**rates)
            sdk = OpenAI(api_key="test", base_url=fake.base_url, max_retries=0, timeout=1.0)
            with sdk:
                for i in range(40):
                    with contextlib.suppress(openai.APIStatusError):
                        _create(sdk, f"req {i}")
            return [r.fault for r in fake.requests]

    first, second, other = run(3), run(3), run(4)
    assert first == second
    assert first != other
    assert {"ok", "429", "500"} <= set(first)
    assert set(first) <= {"ok", *rates}


def test_reset_reseeds_and_forgets(server: FakeLLMServer, client: OpenAI) -> None:
    server.set_rates(**{"429": 0.5})
    first = [_fault_of(client) for _ in range(12)]
    server.reset()
    assert server.requests == []
    assert server.billed() == (0, 0)
    assert [_fault_of(client) for _ in range(12)] == ["ok"] * 12  # rates cleared
    server.reset()
    server.set_rates(**{"429": 0.5})
    assert [_fault_of(client) for _ in range(12)] == first


def test_invalid_faults_and_rates_are_rejected(server: FakeLLMServer) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        server.script("ok", "418")
    with pytest.raises(ValueError, match="unknown fault"):
        server.set_rates(teapot=0.1)
    with pytest.raises(ValueError, match="more than 1"):
        server.set_rates(**{"429": 0.7, "500": 0.6})
    assert server.stats()["script"] == []
    assert set(FAULTS) >= set(HTTP_FAULTS)


# ---------------------------------------------------------------------------------------------
# Bookkeeping
# ---------------------------------------------------------------------------------------------


def test_digest_is_sha256_of_canonical_request(server: FakeLLMServer, client: OpenAI) -> None:
    _create(client, "digest me")
    expected = hashlib.sha256(
        json.dumps(
            {
                "model": "gpt-test",
                "messages": [{"role": "user", "content": "digest me"}],
                "response_format": None,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
    ).hexdigest()
    assert server.requests[0].digest == expected
    assert (
        request_digest(
            {"model": "gpt-test", "messages": [{"content": "digest me", "role": "user"}]}
        )
        == expected
    )


def test_answered_sent_again_ignores_retries_after_failures(
    server: FakeLLMServer, client: OpenAI
) -> None:
    server.script("429", "500", "timeout", "disconnect", "malformed")
    for _ in range(4):
        _fault_of(client, "same")
    assert server.answered_sent_again() == []
    _fault_of(client, "same")  # malformed: answered (and billed) even though it is useless
    assert server.answered_sent_again() == []

    _fault_of(client, "other")
    assert server.answered_sent_again() == []


def test_answered_sent_again_after_malformed_is_optional(
    server: FakeLLMServer, client: OpenAI
) -> None:
    server.script("malformed")
    assert _fault_of(client, "bad json") == "ok"  # HTTP-wise a 200
    assert _fault_of(client, "bad json") == "ok"  # re-asked after the broken answer
    digest = server.requests[0].digest
    assert server.answered_sent_again() == [digest]
    assert server.answered_sent_again(count_malformed=False) == []
    assert _fault_of(client, "bad json") == "ok"  # re-asked after a good answer
    assert server.answered_sent_again(count_malformed=False) == [digest]


def test_answered_sent_again_reports_resend_after_ok(server: FakeLLMServer, client: OpenAI) -> None:
    server.script("429")
    assert _fault_of(client, "first") == "429"
    assert _fault_of(client, "first") == "ok"
    assert server.answered_sent_again() == []
    assert _fault_of(client, "second") == "ok"

    assert _fault_of(client, "first") == "ok"  # the engine must never do this
    digest_first = server.requests[0].digest
    assert server.answered_sent_again() == [digest_first]
    assert _fault_of(client, "first") == "ok"
    assert server.answered_sent_again() == [digest_first]  # reported once


def test_requests_returns_a_snapshot(server: FakeLLMServer, client: OpenAI) -> None:
    _create(client)
    snapshot = server.requests
    snapshot[0].answered = False
    snapshot.clear()
    assert len(server.requests) == 1
    assert server.requests[0].answered is True


# ---------------------------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------------------------


def test_timeout_does_not_block_concurrent_requests(server: FakeLLMServer, client: OpenAI) -> None:
    server.script("timeout")
    outcomes: dict[str, str] = {}

    def hung() -> None:
        outcomes["hung"] = _fault_of(client, "hung")

    hung_thread = threading.Thread(target=hung)
    hung_thread.start()
    time.sleep(0.2)  # let it reach the server (deliberately not polling the server's state)

    results: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        fault = _fault_of(client, f"parallel {i}")
        with lock:
            results.append(fault)

    started = time.monotonic()
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=5)
    elapsed = time.monotonic() - started
    hung_thread.join(timeout=5)

    assert results == ["ok"] * 24
    assert elapsed < 0.9, f"parallel requests waited behind the held one ({elapsed:.2f}s)"
    assert outcomes["hung"] == "timeout"
    faults = [r.fault for r in server.requests]
    assert faults[0] == "timeout"
    assert faults[1:] == ["ok"] * 24


def test_keep_alive_connection_serves_many_sequential_requests(
    server: FakeLLMServer, client: OpenAI
) -> None:
    for i in range(30):
        assert _create(client, f"seq {i}").choices[0].message.content == "ok"
    assert len(server.requests) == 30

    # HTTP/1.1 keep-alive with Content-Length: one socket carries several exchanges.
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        sockets = []
        for path in ["/v1/chat/completions", "/v1/chat/completions", "/_fake/stats"]:
            body = json.dumps({"model": "m", "messages": MESSAGES}) if "chat" in path else None
            conn.request("POST" if body else "GET", path, body=body)
            response = conn.getresponse()
            assert response.status == 200
            assert response.version == 11
            assert response.getheader("Content-Length")
            json.loads(response.read())
            sockets.append(conn.sock)
        assert sockets[0] is not None
        assert all(sock is sockets[0] for sock in sockets)
    finally:
        conn.close()


def test_server_does_not_log_to_stderr(
    server: FakeLLMServer, client: OpenAI, capfd: pytest.CaptureFixture[str]
) -> None:
    server.script("ok", "429", "disconnect", "malformed", "500")
    for _ in range(5):
        _fault_of(client)
    urllib.request.urlopen(server.base_url.removesuffix("/v1") + "/_fake/stats").read()
    captured = capfd.readouterr()
    assert captured.err == ""
    assert captured.out == ""


# ---------------------------------------------------------------------------------------------
# Control endpoints and CLI
# ---------------------------------------------------------------------------------------------


def _post(url: str, payload: Any) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_control_endpoints_drive_the_server(server: FakeLLMServer, client: OpenAI) -> None:
    root = server.base_url.removesuffix("/v1")
    status, _ = _post(root + "/_fake/script", {"faults": ["429", "ok"]})
    assert status == 200
    status, _ = _post(root + "/_fake/rates", {"rates": {"500": 1.0}})
    assert status == 200

    assert [_fault_of(client) for _ in range(3)] == ["429", "ok", "500"]

    stats = _get(root + "/_fake/stats")
    assert [r["fault"] for r in stats["requests"]] == ["429", "ok", "500"]
    assert [r["answered"] for r in stats["requests"]] == [False, True, False]
    assert stats["billed"] == {
        "prompt_tokens": server.billed()[0],
        "completion_tokens": server.billed()[1],
    }
    assert stats["rates"] == {"500": 1.0}

    status, body = _post(root + "/_fake/script", {"faults": ["teapot"]})
    assert status == 400
    assert "unknown fault" in body["error"]["message"]

    status, _ = _post(root + "/_fake/reset", {})
    assert status == 200
    assert _get(root + "/_fake/stats")["requests"] == []
    assert _fault_of(client) == "ok"


def test_cli_serves_until_sigterm() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fakes.llm_server",
            "--port",
            "0",
            "--seed",
            "1",
            "--rate",
            "429=1.0",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:")
        assert base_url.endswith("/v1")
        with OpenAI(api_key="test", base_url=base_url, max_retries=0, timeout=1.0) as sdk:
            assert _fault_of(sdk) == "429"
            _post(base_url.removesuffix("/v1") + "/_fake/rates", {})
            assert _fault_of(sdk) == "ok"
        stats = _get(base_url.removesuffix("/v1") + "/_fake/stats")
        assert [r["fault"] for r in stats["requests"]] == ["429", "ok"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err
    assert err == ""


# ---------------------------------------------------------------------------------------------
# Schema instances
# ---------------------------------------------------------------------------------------------


class Node(pydantic.BaseModel):
    name: str
    children: list[Node] = []


class Constrained(pydantic.BaseModel):
    code: str = pydantic.Field(min_length=6, max_length=8)
    count: int = pydantic.Field(ge=3, le=9)
    ratio: float = pydantic.Field(gt=0.5)
    tags: set[str] = pydantic.Field(min_length=3)
    pair: tuple[int, str]
    mapping: dict[str, int]
    maybe: int | None
    either: int | str
    nested: Finding | None


@pytest.mark.parametrize("model", [VisitSummary, Node, Constrained])
def test_schema_instance_validates_against_pydantic(model: type[pydantic.BaseModel]) -> None:
    instance = schema_instance(model.model_json_schema())
    model.model_validate_json(json.dumps(instance))


def test_schema_instance_details() -> None:
    schema = {
        "$defs": {"Kind": {"enum": ["x", "y"], "type": "string"}},
        "type": "object",
        "properties": {
            "kind": {"$ref": "#/$defs/Kind"},
            "items": {"type": "array", "items": {"type": "integer"}, "minItems": 3},
            "none": {"type": "array", "items": {"type": "string"}, "maxItems": 0},
            "opt": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 4}]},
            "null": {"type": "null"},
            "flag": {"type": "boolean"},
            "num": {"type": "number"},
            "word": {"type": "string", "minLength": 7},
        },
        "required": ["kind"],
    }
    assert schema_instance(schema) == {
        "kind": "x",
        "items": [0, 0, 0],
        "none": [],
        "opt": 4,
        "null": None,
        "flag": True,
        "num": 0.0,
        "word": "stubxxx",
    }
