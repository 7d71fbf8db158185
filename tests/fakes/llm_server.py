"""A loopback fake of the OpenAI chat-completions HTTP API that injects faults and bills tokens.

Product tests point the real ``openai`` SDK at ``FakeLLMServer.base_url`` so that timeouts,
retries and error classification are exercised over real HTTP rather than mocks. Each request
gets a fault, scripted in order (``script``) or drawn at seeded random rates (``set_rates``), and
is recorded with a digest of what it asked, so that tests can check what was billed (``billed``)
and that an answered question was never paid for twice (``answered_sent_again``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Self

from tests.fakes.loopback import LoopbackHandler, LoopbackServer

# fault -> (status, error type, error code, message), shaped like the real API's errors because
# the product's error messages quote them.
HTTP_FAULTS: dict[str, tuple[int, str, str | None, str]] = {
    "400": (400, "invalid_request_error", None, "Injected fault: bad request."),
    "401": (401, "invalid_request_error", "invalid_api_key", "Injected fault: invalid API key."),
    "403": (403, "permission_denied", None, "Injected fault: permission denied."),
    "404": (404, "invalid_request_error", "model_not_found", "Injected fault: model not found."),
    "408": (408, "timeout", None, "Injected fault: request timeout."),
    "409": (409, "conflict", None, "Injected fault: conflict."),
    "422": (422, "invalid_request_error", None, "Injected fault: unprocessable entity."),
    "429": (429, "requests", "rate_limit_exceeded", "Injected fault: rate limit reached."),
    "500": (500, "server_error", None, "Injected fault: internal server error."),
    "503": (503, "server_error", "service_unavailable", "Injected fault: service unavailable."),
}
# "timeout" holds the request without answering, "disconnect" drops the connection, "malformed"
# answers (and bills) JSON cut in half.
FAULTS = frozenset({"ok", "timeout", "disconnect", "malformed", *HTTP_FAULTS})


@dataclass
class RecordedRequest:
    """One chat-completions request and what the fake did with it."""

    digest: str  # request_digest(body): which question was asked
    model: str
    fault: str
    received_at: float  # time.monotonic()
    answered_at: float | None = None  # when a 200 with content (ok or malformed) was booked
    prompt_tokens: int = 0  # billed tokens: 0 unless answered
    completion_tokens: int = 0
    max_tokens: int | None = None  # the answer's length the request allowed, as sent

    @property
    def answered(self) -> bool:
        return self.answered_at is not None


def request_digest(body: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of what decides the answer: model, messages, response_format.

    The same canonical form as the product's ``gateway.request_digest``, so tests can match
    what the product memoized against what went over the wire."""
    asked = {key: body.get(key) for key in ("model", "messages", "response_format")}
    canonical = json.dumps(asked, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def default_content(body: Mapping[str, Any]) -> str:
    """The fake's answer: the simplest instance of a ``json_schema`` response format, else "ok".

    Every property is filled, every list has one item, strings are "stub" (a choice, its first)
    and numbers 0, so every statement cites transcript segment 0, which every transcript has."""
    response_format = body.get("response_format") or {}
    if response_format.get("type") != "json_schema":
        return "ok"
    schema = response_format["json_schema"]["schema"]
    return json.dumps(_instance(schema, schema.get("$defs", {})))


def _instance(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> Any:
    """Only the keywords pydantic emits for the product's models are understood."""
    if "$ref" in schema:  # always "#/$defs/Name"
        return _instance(defs[schema["$ref"].rsplit("/", 1)[1]], defs)
    if "anyOf" in schema:  # pydantic puts the null branch of `X | None` last
        return _instance(schema["anyOf"][0], defs)
    if "enum" in schema:  # a Literal: its first choice
        return schema["enum"][0]
    kind: str = schema.get("type", "")
    if kind == "object":
        return {name: _instance(prop, defs) for name, prop in schema["properties"].items()}
    if kind == "array":  # one item, to satisfy `min_length=1` on segment_ids
        return [_instance(schema["items"], defs)]
    return {"string": "stub", "integer": 0, "number": 0, "boolean": True}.get(kind)


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))  # roughly what a tokenizer gives for English


class _Handler(LoopbackHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/v1/chat/completions":
            self.server.fake._handle_chat(self, body)
        else:
            self.send_json(404, {"error": {"message": f"no route {self.path}", "code": None}})

    def send_json(
        self, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class FakeLLMServer:
    """Loopback OpenAI chat-completions server with scripted and seeded random faults.

    ``with FakeLLMServer() as server: OpenAI(base_url=server.base_url, ...)``
    """

    def __init__(self, *, seed: int = 0, timeout_seconds: float = 3.0) -> None:
        self.seed = seed
        # How long a "timeout" request is held before the connection is dropped; longer than
        # the client's timeout, so that the client is the one that gives up.
        self.timeout_seconds = timeout_seconds
        # Given the request body, returns the assistant's content (faults apply on top).
        self.responder: Callable[[dict[str, Any]], str] = default_content
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._script: deque[str] = deque()
        self._rates: dict[str, float] = {}
        self._requests: list[RecordedRequest] = []
        self._httpd: LoopbackServer | None = None

    def __enter__(self) -> Self:
        self._httpd = LoopbackServer(self, _Handler)
        self._httpd.serve_in_background()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._httpd is not None
        self._httpd.stop()
        self._httpd = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "use FakeLLMServer as a context manager"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    # -- faults ------------------------------------------------------------------------------

    def script(self, *faults: str) -> None:
        """Apply ``faults`` to the next requests, in order, before any random draw."""
        _check(faults)
        with self._lock:
            self._script.extend(faults)

    def set_rates(self, **rates: float) -> None:
        """Draw each unscripted request's fault with these probabilities (the rest is "ok")."""
        _check(rates)
        if sum(rates.values()) > 1:
            raise ValueError(f"fault rates {rates} add up to more than 1")
        with self._lock:
            self._rates = dict(rates)

    def reset(self) -> None:
        """Forget the requests, the script and the rates; reseed, so draws repeat."""
        with self._lock:
            self._requests.clear()
            self._script.clear()
            self._rates = {}
            self._rng = random.Random(self.seed)

    def _next_fault(self) -> str:
        """The caller holds the lock. A hook for ChaosLLMServer."""
        if self._script:
            return self._script.popleft()
        draw = self._rng.random()
        for fault, rate in self._rates.items():
            if draw < rate:
                return fault
            draw -= rate
        return "ok"

    # -- the ledger --------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Copies of every recorded request, in arrival order."""
        with self._lock:
            return [replace(record) for record in self._requests]

    def billed(self) -> tuple[int, int]:
        """Total (prompt tokens, completion tokens) of the answered requests."""
        with self._lock:
            return (
                sum(record.prompt_tokens for record in self._requests),
                sum(record.completion_tokens for record in self._requests),
            )

    def answered_sent_again(self, *, count_malformed: bool = True) -> list[str]:
        """Digests of requests that arrived after an identical one had been answered, once each.

        A malformed answer was delivered and billed, so asking again after it counts too, unless
        ``count_malformed=False``: under random faults a re-ask after broken JSON is legitimate."""
        with self._lock:
            first_answer: dict[str, float] = {}
            for record in self._requests:
                if record.answered_at is None or (
                    record.fault == "malformed" and not count_malformed
                ):
                    continue
                earlier = first_answer.get(record.digest, math.inf)
                first_answer[record.digest] = min(earlier, record.answered_at)
            again: list[str] = []
            for record in self._requests:
                asked_again = record.received_at >= first_answer.get(record.digest, math.inf)
                if asked_again and record.digest not in again:
                    again.append(record.digest)
            return again

    # -- serving -----------------------------------------------------------------------------

    def _handle_chat(self, handler: _Handler, body: dict[str, Any]) -> None:
        """Apply the next fault to one request. A hook for ChaosLLMServer."""
        with self._lock:
            fault = self._next_fault()
            record = RecordedRequest(
                request_digest(body),
                body["model"],
                fault,
                time.monotonic(),
                max_tokens=body.get("max_tokens"),
            )
            self._requests.append(record)
        if fault in ("timeout", "disconnect"):
            if fault == "timeout":
                time.sleep(self.timeout_seconds)
            handler.drop_connection()
            return
        if fault in HTTP_FAULTS:
            status, kind, code, message = HTTP_FAULTS[fault]
            error = {"message": message, "type": kind, "param": None, "code": code}
            # "retry-after: 0" lets the product honour Retry-After without slowing the tests.
            headers = {"retry-after": "0"} if status == 429 else None
            handler.send_json(status, {"error": error}, headers)
            return

        content = self.responder(body)
        if fault == "malformed":
            # Cut in half, like an answer that hit max_tokens: JSON without its end never parses.
            content = content[: len(content) // 2]
        prompt_tokens = _tokens(json.dumps(body["messages"]))
        completion_tokens = _tokens(content)
        answer = {"role": "assistant", "content": content, "refusal": None}
        completion = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": answer, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        # Book before writing, so a client that has read the answer finds it in the ledger;
        # unbook if it could not be written, as the client then never had it.
        with self._lock:
            record.answered_at = time.monotonic()
            record.prompt_tokens, record.completion_tokens = prompt_tokens, completion_tokens
        try:
            handler.send_json(200, completion)
        except OSError:
            with self._lock:
                record.answered_at = None
                record.prompt_tokens = record.completion_tokens = 0
            raise


def _check(faults: Iterable[str]) -> None:
    if unknown := set(faults) - FAULTS:
        raise ValueError(f"unknown fault(s) {sorted(unknown)}; expected some of {sorted(FAULTS)}")
