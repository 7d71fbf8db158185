"""A fault-injecting fake of the OpenAI chat-completions HTTP API.

``FakeLLMServer`` is a real loopback HTTP/1.1 server (stdlib ``ThreadingHTTPServer`` running in a
background thread) that answers ``POST /v1/chat/completions`` the way the official ``openai`` SDK
expects, including ``client.chat.completions.parse(..., response_format=SomeModel)``: the default
answer is a JSON instance generated from the request's JSON schema.  Each request can instead be
given a *fault* (an HTTP error status, a hung connection, a dropped connection or a truncated JSON
answer), either scripted in order or drawn at seeded random rates, so tests can prove retry
behaviour over real HTTP.

Every request is recorded (``requests``) with a digest of what was asked, so tests can check that
an answer that was already delivered is never paid for twice (``answered_sent_again``) and what
was billed in total (``billed``).

Other processes can drive a running server over HTTP:

* ``GET /_fake/stats`` -- recorded requests, billed totals and the current script/rates;
* ``POST /_fake/script`` with ``{"faults": ["429", "ok"]}`` -- same as ``script(...)``;
* ``POST /_fake/rates`` with ``{"rates": {"429": 0.2}}`` (or the mapping itself) -- same as
  ``set_rates(...)``;
* ``POST /_fake/reset`` -- same as ``reset()``.

Command line (serves until SIGTERM or Ctrl-C; the first line on stdout is the base URL)::

    python -m tests.fakes.llm_server --port 8765 --seed 1 --rate 429=0.2 --rate timeout=0.05
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import random
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = [
    "FAULTS",
    "HTTP_FAULTS",
    "FakeLLMServer",
    "RecordedRequest",
    "default_content",
    "malform",
    "request_digest",
    "schema_instance",
]

FAULTS: tuple[str, ...] = (
    "ok",
    "401",
    "403",
    "400",
    "404",
    "422",
    "408",
    "409",
    "429",
    "500",
    "503",
    "timeout",
    "malformed",
    "disconnect",
)

#: Faults answered with an HTTP error status: fault -> (status, error type, error code, message).
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

_ANSWERING_FAULTS = frozenset({"ok", "malformed"})
_MAX_DEPTH = 12
_CHAT_PATH = "/v1/chat/completions"


@dataclass
class RecordedRequest:
    """One request received on ``/v1/chat/completions`` and what the server did with it."""

    digest: str
    """sha256 hex of canonical JSON of ``{"model", "messages", "response_format"}``."""
    model: str
    fault: str
    """Which of ``FAULTS`` was applied."""
    answered: bool
    """True iff a 200 response with a body was sent (``ok`` or ``malformed``)."""
    prompt_tokens: int
    """Billed prompt tokens; 0 unless answered."""
    completion_tokens: int
    """Billed completion tokens; 0 unless answered."""
    received_at: float
    """``time.time()`` when the request body had been read."""


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def request_digest(body: Mapping[str, Any]) -> str:
    """Return the sha256 hex digest identifying what a chat-completions request asks for.

    The digest covers ``model``, ``messages`` and ``response_format`` (missing keys count as
    ``null``), serialised as canonical JSON (sorted keys, no whitespace).
    """
    payload = {
        "model": body.get("model"),
        "messages": body.get("messages"),
        "response_format": body.get("response_format"),
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _resolve_ref(root: Mapping[str, Any], ref: str) -> Mapping[str, Any]:
    """Resolve a local JSON pointer such as ``#/$defs/Item`` against ``root``."""
    if not ref.startswith("#"):
        raise ValueError(f"only local $ref is supported, got {ref!r}")
    node: Any = root
    for raw in ref[1:].split("/"):
        if not raw:
            continue
        part = raw.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    if not isinstance(node, Mapping):
        raise ValueError(f"$ref {ref!r} does not point at a schema object")
    return node


def _is_null_schema(schema: Any) -> bool:
    if not isinstance(schema, Mapping):
        return False
    typ = schema.get("type")
    return typ == "null" or (isinstance(typ, list) and typ == ["null"])


_STRING_FORMATS = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00",
    "duration": "PT0S",
    "email": "stub@example.com",
    "uri": "https://example.com/stub",
    "url": "https://example.com/stub",
    "hostname": "example.com",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def _string_instance(schema: Mapping[str, Any], variant: int) -> str:
    fmt = schema.get("format")
    if fmt in _STRING_FORMATS and variant == 0:
        return _STRING_FORMATS[fmt]
    value = "stub" if variant == 0 else f"stub{variant}"
    min_len = schema.get("minLength")
    if isinstance(min_len, int) and len(value) < min_len:
        value = value + "x" * (min_len - len(value))
    max_len = schema.get("maxLength")
    if isinstance(max_len, int) and len(value) > max_len:
        value = value[:max_len]
    return value


def _numeric_bounds(schema: Mapping[str, Any], step: float) -> tuple[float | None, float | None]:
    low = schema.get("minimum")
    ex_low = schema.get("exclusiveMinimum")
    if isinstance(ex_low, (int, float)) and not isinstance(ex_low, bool):
        low = ex_low + step if low is None else max(low, ex_low + step)
    high = schema.get("maximum")
    ex_high = schema.get("exclusiveMaximum")
    if isinstance(ex_high, (int, float)) and not isinstance(ex_high, bool):
        high = ex_high - step if high is None else min(high, ex_high - step)
    return low, high


def _number_instance(schema: Mapping[str, Any], variant: int, *, integer: bool) -> int | float:
    low, high = _numeric_bounds(schema, 1 if integer else 0.5)
    if low is not None:
        value: float = math.ceil(low) if integer else low
    elif high is not None and high < 0:
        value = math.floor(high) if integer else high
    else:
        value = 0
    value += variant
    if high is not None and value > high:
        value = math.floor(high) if integer else high
    return int(value) if integer else float(value)


def schema_instance(
    schema: Mapping[str, Any] | bool,
    root: Mapping[str, Any] | None = None,
    *,
    _depth: int = 0,
    _variant: int = 0,
) -> Any:
    """Build a JSON value that validates against ``schema`` (the subset used by structured outputs).

    Handles ``$ref``/``$defs``, ``const``, ``enum`` (first value), ``anyOf``/``oneOf`` (first
    non-null branch), ``allOf`` (merged objects), objects (every property is filled, required or
    not), arrays (``minItems``, default one item; ``prefixItems``), strings (``"stub"``, common
    ``format`` values, ``minLength``/``maxLength``), integers and numbers (``minimum``/``maximum``,
    default 0), booleans and ``null``.  Recursive schemas are cut off below a fixed depth by
    preferring ``null`` branches, empty arrays and required-only objects.
    """
    if isinstance(schema, bool) or not isinstance(schema, Mapping):
        return None
    root = schema if root is None else root
    deep = _depth >= _MAX_DEPTH
    if _depth > _MAX_DEPTH * 4:
        raise ValueError("schema recursion is too deep to instantiate")

    if "$ref" in schema:
        target = _resolve_ref(root, schema["$ref"])
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return schema_instance(merged, root, _depth=_depth + 1, _variant=_variant)
    if "const" in schema:
        return copy.deepcopy(schema["const"])
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return copy.deepcopy(enum[_variant % len(enum)])
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            non_null = [b for b in branches if not _is_null_schema(b)]
            if deep and len(non_null) < len(branches):
                return None
            chosen = non_null[0] if non_null else branches[0]
            return schema_instance(chosen, root, _depth=_depth + 1, _variant=_variant)
    all_of = schema.get("allOf")
    if isinstance(all_of, list) and all_of:
        parts = [schema_instance(s, root, _depth=_depth + 1, _variant=_variant) for s in all_of]
        if all(isinstance(p, dict) for p in parts):
            merged_obj: dict[str, Any] = {}
            for part in parts:
                merged_obj.update(part)
            return merged_obj
        return parts[0]

    typ = schema.get("type")
    if isinstance(typ, list):
        non_null_types = [t for t in typ if t != "null"]
        typ = "null" if deep and "null" in typ else (non_null_types or ["null"])[0]
    if typ is None:
        if "properties" in schema:
            typ = "object"
        elif "items" in schema or "prefixItems" in schema:
            typ = "array"
        else:
            return None

    if typ == "object":
        properties = schema.get("properties")
        if not isinstance(properties, Mapping):
            return {}
        required = set(schema.get("required") or ())
        return {
            name: schema_instance(prop, root, _depth=_depth + 1)
            for name, prop in properties.items()
            if not deep or name in required
        }
    if typ == "array":
        return _array_instance(schema, root, _depth)
    if typ == "string":
        return _string_instance(schema, _variant)
    if typ == "integer":
        return _number_instance(schema, _variant, integer=True)
    if typ == "number":
        return _number_instance(schema, _variant, integer=False)
    if typ == "boolean":
        return _variant % 2 == 0
    return None


def _array_instance(schema: Mapping[str, Any], root: Mapping[str, Any], depth: int) -> list[Any]:
    min_items = schema.get("minItems")
    min_items = min_items if isinstance(min_items, int) else 0
    max_items = schema.get("maxItems")
    count = min_items if depth >= _MAX_DEPTH else max(min_items, 1)
    if isinstance(max_items, int):
        count = min(count, max_items)
    prefix = schema.get("prefixItems")
    items = schema.get("items")
    if isinstance(items, list):  # draft-4 style tuple
        prefix, items = items, schema.get("additionalItems", {})
    out: list[Any] = []
    if isinstance(prefix, list):
        out = [schema_instance(s, root, _depth=depth + 1) for s in prefix]
        if items is False:
            return out
    unique = bool(schema.get("uniqueItems"))
    while len(out) < count:
        variant = len(out) if unique else 0
        out.append(schema_instance(items or {}, root, _depth=depth + 1, _variant=variant))
    return out


def default_content(body: Mapping[str, Any]) -> str:
    """Return the default assistant message content for a chat-completions request body.

    ``json_schema`` response formats get ``json.dumps(schema_instance(schema))``; ``json_object``
    gets ``"{}"``; anything else (including no ``response_format``) gets ``"ok"``.
    """
    response_format = body.get("response_format")
    if not isinstance(response_format, Mapping):
        return "ok"
    kind = response_format.get("type")
    if kind == "json_schema":
        json_schema = response_format.get("json_schema") or {}
        schema = json_schema.get("schema") if isinstance(json_schema, Mapping) else None
        return json.dumps(schema_instance(schema if isinstance(schema, Mapping) else {}))
    if kind == "json_object":
        return "{}"
    return "ok"


def malform(content: str) -> str:
    """Return ``content`` truncated in the middle so that it is guaranteed not to be valid JSON."""
    truncated = content[: len(content) // 2]
    try:
        json.loads(truncated)
    except ValueError:
        return truncated
    return '{"' + truncated  # an unterminated string is never valid JSON


def _ceil_quarter(length: int) -> int:
    return max(1, math.ceil(length / 4))


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    """Threaded HTTP server that tracks open connections and never prints tracebacks."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 256
    fake: FakeLLMServer

    def __init__(self, address: tuple[str, int], fake: FakeLLMServer) -> None:
        self.fake = fake
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Swallow per-connection errors (client resets, broken pipes) silently."""


class _Handler(BaseHTTPRequestHandler):
    """Request handler: HTTP/1.1 keep-alive, every response carries Content-Length."""

    protocol_version = "HTTP/1.1"
    server_version = "FakeLLM/1.0"
    sys_version = ""
    server: _HTTPServer

    def setup(self) -> None:
        """Register the connection so ``stop()`` can close idle keep-alive sockets."""
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.connections_lock:
            self.server.open_connections.add(self.connection)

    def finish(self) -> None:
        """Unregister the connection."""
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.open_connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Do not log requests to stderr."""

    # -- helpers ---------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send_json(
        self, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        """Send ``payload`` as a JSON response with Content-Length."""
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def send_error_json(
        self,
        status: int,
        message: str,
        kind: str,
        code: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Send an OpenAI-style error body ``{"error": {"message", "type", "param", "code"}}``."""
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        self.send_json(status, body, headers)

    def drop_connection(self) -> None:
        """Close the socket without sending anything."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _json_body(self) -> Any:
        raw = self._read_body()
        try:
            return json.loads(raw or b"null")
        except ValueError:
            return ValueError("request body is not valid JSON")

    # -- verbs -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        """Serve ``/_fake/stats``."""
        path = self.path.split("?", 1)[0]
        if path == "/_fake/stats":
            self.send_json(200, self.server.fake.stats())
        else:
            self.send_error_json(404, f"Unknown path {path}", "invalid_request_error", None)

    def do_POST(self) -> None:
        """Serve chat completions and the ``/_fake/*`` control endpoints."""
        path = self.path.split("?", 1)[0]
        body = self._json_body()
        if isinstance(body, ValueError):
            self.send_error_json(400, str(body), "invalid_request_error", None)
            return
        fake = self.server.fake
        if path == _CHAT_PATH:
            if not isinstance(body, dict):
                self.send_error_json(400, "body must be an object", "invalid_request_error", None)
                return
            fake._handle_chat(self, body)
            return
        try:
            if path == "/_fake/script":
                faults = body.get("faults") if isinstance(body, dict) else body
                fake.script(*list(faults or []))
            elif path == "/_fake/rates":
                rates = body.get("rates", body) if isinstance(body, dict) else None
                if not isinstance(rates, dict):
                    raise ValueError("rates must be an object of fault -> probability")
                fake.set_rates(**{str(k): float(v) for k, v in rates.items()})
            elif path == "/_fake/reset":
                fake.reset()
            else:
                self.send_error_json(404, f"Unknown path {path}", "invalid_request_error", None)
                return
        except (TypeError, ValueError) as exc:
            self.send_error_json(400, str(exc), "invalid_request_error", None)
            return
        self.send_json(200, fake.stats())


# --------------------------------------------------------------------------------------------
# The fake
# --------------------------------------------------------------------------------------------


class FakeLLMServer:
    """Loopback OpenAI chat-completions server with scripted and random fault injection.

    Use as a context manager (or call ``start()``/``stop()``)::

        with FakeLLMServer(seed=1) as server:
            server.script("429", "ok")
            client = OpenAI(api_key="test", base_url=server.base_url, max_retries=0)
    """

    responder: Callable[[dict[str, Any]], str] | None
    """Given the parsed request body, return the assistant content; ``None`` = default_content."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        timeout_seconds: float = 3.0,
    ) -> None:
        """Configure the server; nothing listens until ``start()``."""
        self.host = host
        self.port = port
        self.seed = seed
        self.timeout_seconds = timeout_seconds
        self.responder = None
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._script: deque[str] = deque()
        self._rates: dict[str, float] = {}
        self._requests: list[RecordedRequest] = []
        self._answered_at: dict[int, float] = {}  # id(record) -> time the answer was written
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeLLMServer:
        """Bind the socket and serve in a daemon thread; returns ``self``."""
        if self._httpd is not None:
            raise RuntimeError("FakeLLMServer is already started")
        self._stopping.clear()
        self._httpd = _HTTPServer((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"FakeLLMServer:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake held ("timeout") requests and close every open connection."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        with httpd.connections_lock:
            connections = list(httpd.open_connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> FakeLLMServer:
        """Start the server."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()

    @property
    def base_url(self) -> str:
        """Base URL for ``OpenAI(base_url=...)``, e.g. ``http://127.0.0.1:PORT/v1``."""
        if self._httpd is None:
            raise RuntimeError("FakeLLMServer is not started")
        return f"http://{self.host}:{self.port}/v1"

    # -- fault control -----------------------------------------------------------------------

    def script(self, *faults: str) -> None:
        """Queue ``faults`` for the next requests, in order (appended to any still queued)."""
        for fault in faults:
            _check_fault(fault)
        with self._lock:
            self._script.extend(faults)

    def set_rates(self, **rates: float) -> None:
        """Replace the random fault rates, e.g. ``set_rates(**{"429": 0.1, "timeout": 0.05})``.

        Unscripted requests draw a fault with these probabilities from a ``random.Random`` seeded
        with ``seed``; the remaining probability is ``"ok"``.
        """
        for fault, rate in rates.items():
            _check_fault(fault)
            if not 0.0 <= float(rate) <= 1.0:
                raise ValueError(f"rate for {fault!r} must be within [0, 1], got {rate!r}")
        if sum(float(r) for r in rates.values()) > 1.0 + 1e-9:
            raise ValueError("fault rates add up to more than 1")
        with self._lock:
            self._rates = {f: float(rates[f]) for f in FAULTS if f in rates}

    def reset(self) -> None:
        """Forget recorded requests, the script and the rates, and reseed the random generator."""
        with self._lock:
            self._requests.clear()
            self._answered_at.clear()
            self._script.clear()
            self._rates = {}
            self._rng = random.Random(self.seed)

    def _next_fault(self) -> str:
        """Pop the next scripted fault or draw one from the rates. Caller holds the lock."""
        if self._script:
            return self._script.popleft()
        draw = self._rng.random()
        cumulative = 0.0
        for fault, rate in self._rates.items():
            cumulative += rate
            if draw < cumulative:
                return fault
        return "ok"

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot (copies) of every recorded chat-completions request, in arrival order."""
        with self._lock:
            return [dataclasses.replace(r) for r in self._requests]

    def answered_sent_again(self, *, count_malformed: bool = True) -> list[str]:
        """Digests of requests received again after an identical request had been answered.

        Each digest is listed once, in the order the repeats arrived.  By default a
        ``"malformed"`` answer counts as answered (it was delivered and billed); pass
        ``count_malformed=False`` to only count well-formed (``"ok"``) answers, e.g. when the
        caller legitimately re-asks after receiving invalid JSON.
        """
        with self._lock:
            answered: dict[str, float] = {}  # digest -> earliest answer time
            for record in self._requests:
                at = self._answered_at.get(id(record))
                if at is not None and (count_malformed or record.fault != "malformed"):
                    answered[record.digest] = min(at, answered.get(record.digest, at))
            again: list[str] = []
            for record in self._requests:
                first = answered.get(record.digest)
                if first is not None and record.received_at >= first and record.digest not in again:
                    again.append(record.digest)
            return again

    def billed(self) -> tuple[int, int]:
        """Total ``(prompt_tokens, completion_tokens)`` over answered requests."""
        with self._lock:
            prompt = sum(r.prompt_tokens for r in self._requests if r.answered)
            completion = sum(r.completion_tokens for r in self._requests if r.answered)
        return prompt, completion

    def stats(self) -> dict[str, Any]:
        """JSON-ready summary served at ``GET /_fake/stats``."""
        requests = self.requests
        prompt, completion = self.billed()
        with self._lock:
            script, rates = list(self._script), dict(self._rates)
        return {
            "requests": [dataclasses.asdict(r) for r in requests],
            "billed": {"prompt_tokens": prompt, "completion_tokens": completion},
            "answered_sent_again": self.answered_sent_again(),
            "script": script,
            "rates": rates,
        }

    # -- request handling ----------------------------------------------------------------------

    def _handle_chat(self, handler: _Handler, body: dict[str, Any]) -> None:
        """Apply the next fault to one chat-completions request."""
        model = str(body.get("model") or "")
        with self._lock:
            fault = self._next_fault()
            record = RecordedRequest(
                digest=request_digest(body),
                model=model,
                fault=fault,
                answered=False,
                prompt_tokens=0,
                completion_tokens=0,
                received_at=time.time(),
            )
            self._requests.append(record)

        if fault == "timeout":
            self._stopping.wait(self.timeout_seconds)
            handler.drop_connection()
            return
        if fault == "disconnect":
            handler.drop_connection()
            return
        if fault in HTTP_FAULTS:
            status, kind, code, message = HTTP_FAULTS[fault]
            headers = {"retry-after": "0"} if status == 429 else None
            handler.send_error_json(status, message, kind, code, headers)
            return

        responder = self.responder or default_content
        try:
            content = responder(body)
        except Exception as exc:
            handler.send_error_json(500, f"responder failed: {exc!r}", "server_error", None)
            return
        if fault == "malformed":
            content = malform(content)
        messages = body.get("messages")
        prompt_tokens = _ceil_quarter(len(json.dumps(messages)))
        completion_tokens = _ceil_quarter(len(content))
        payload = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": "fp_fake",
        }
        # Book the answer before writing it, so a client that has just read the response always
        # sees it in ``billed()``/``requests``; undo it if the write fails.
        with self._lock:
            record.answered = True
            record.prompt_tokens = prompt_tokens
            record.completion_tokens = completion_tokens
            self._answered_at[id(record)] = time.time()
        try:
            handler.send_json(200, payload)
        except OSError:
            with self._lock:
                record.answered = False
                record.prompt_tokens = record.completion_tokens = 0
                self._answered_at.pop(id(record), None)
            raise


def _check_fault(fault: str) -> None:
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; expected one of {', '.join(FAULTS)}")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _parse_rate(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected FAULT=RATE, got {text!r}")
    name = name.strip()
    if name not in FAULTS:
        raise argparse.ArgumentTypeError(f"unknown fault {name!r}")
    try:
        return name, float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad rate {value!r}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Run a FakeLLMServer until SIGTERM or Ctrl-C; prints the base URL as the first line."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.llm_server",
        description="Fault-injecting fake OpenAI chat-completions server (see module docstring).",
        epilog="Control: GET /_fake/stats; POST /_fake/script, /_fake/rates, /_fake/reset",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-seconds", type=float, default=3.0)
    parser.add_argument(
        "--rate", action="append", type=_parse_rate, default=[], metavar="FAULT=RATE"
    )
    parser.add_argument(
        "--script",
        action="append",
        default=[],
        metavar="FAULT",
        choices=FAULTS,
        help="queue a scripted fault (repeatable, in order)",
    )
    args = parser.parse_args(argv)

    server = FakeLLMServer(
        host=args.host, port=args.port, seed=args.seed, timeout_seconds=args.timeout_seconds
    )
    try:
        server.set_rates(**dict(args.rate))
    except ValueError as exc:
        parser.error(str(exc))
    server.script(*args.script)

    done = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    server.start()
    print(server.base_url, flush=True)
    try:
        while not done.wait(0.2):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
