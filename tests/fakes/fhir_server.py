"""A loopback fake of a FHIR R4 server that receives document Bundles and injects faults.

Tests of durable delivery to an EHR point the product's real HTTP client at
``FakeFhirServer.base_url`` so that what matters is exercised over real HTTP rather than mocks:
a retry after a 503 with ``Retry-After``, a timeout after the server had in fact stored the
Bundle ("timeout_after_store"), and the conditional create (``If-None-Exist``) that keeps such a
retry exactly-once. Each POST gets the next scripted fault (``script``) and every request is
recorded without its credentials, so that tests can check what was stored (``stored``,
``count_for``) and what the client sent (``requests``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import secrets
import threading
from collections import deque
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import SplitResult, parse_qs, urlsplit

from tests.fakes.loopback import LoopbackHandler, LoopbackServer

FHIR_JSON = "application/fhir+json"
BASE_PATH = "/fhir"
# fault -> (status, OperationOutcome issue code, diagnostics)
HTTP_FAULTS: dict[str, tuple[int, str, str]] = {
    "400": (400, "invalid", "Injected fault: bad request."),
    "401": (401, "login", "Injected fault: authentication required."),
    "404": (404, "not-found", "Injected fault: not found."),
    "408": (408, "timeout", "Injected fault: request timeout."),
    "409": (409, "conflict", "Injected fault: conflict."),
    "422": (422, "processing", "Injected fault: unprocessable entity."),
    "429": (429, "throttled", "Injected fault: too many requests."),
    "500": (500, "exception", "Injected fault: internal server error."),
    "502": (502, "transient", "Injected fault: bad gateway."),
    "503": (503, "transient", "Injected fault: service unavailable."),
}
# "timeout" holds the request without storing, then drops it; "timeout_after_store" stores (or
# finds, under If-None-Exist) and then holds before answering; "disconnect" drops at once.
FAULTS = frozenset({"ok", "timeout", "timeout_after_store", "disconnect", *HTTP_FAULTS})
CAPABILITY_STATEMENT = {
    "resourceType": "CapabilityStatement",
    "status": "active",
    "date": "2024-01-01",
    "kind": "instance",
    "fhirVersion": "4.0.1",
    "format": [FHIR_JSON],
    "rest": [{"mode": "server", "resource": [{"type": "Bundle", "conditionalCreate": True}]}],
}

Answer = tuple[int, dict[str, Any], dict[str, str]]  # status, JSON body, extra headers


@dataclass
class RecordedRequest:
    """One request and what the fake did with it."""

    method: str
    path: str  # with its query string
    headers: dict[str, str]  # names lower-cased; never Authorization
    had_auth: bool  # whether an Authorization header came (its value is not kept)
    identifier: str | None  # the POSTed Bundle's identifier.value, or the searched value
    fault: str | None  # None for a GET: only POSTs consume the script
    status: int | None = None  # None while held, or when never answered


def outcome(
    status: int, code: str, diagnostics: str, headers: dict[str, str] | None = None
) -> Answer:
    """An error answer: an OperationOutcome with one issue."""
    issue = {"severity": "error", "code": code, "diagnostics": diagnostics}
    return status, {"resourceType": "OperationOutcome", "issue": [issue]}, headers or {}


class _Handler(LoopbackHandler):
    def do_GET(self) -> None:
        self.server.fake._handle(self, b"")

    def do_POST(self) -> None:
        self.server.fake._handle(self, self.rfile.read(int(self.headers["Content-Length"] or 0)))

    def send_json(self, answer: Answer) -> None:
        status, payload, headers = answer
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", f"{FHIR_JSON}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class FakeFhirServer:
    """Loopback FHIR R4 server storing Bundles, with conditional create and scripted faults.

    ``with FakeFhirServer(token="secret") as fhir: httpx.post(f"{fhir.base_url}/Bundle", ...)``
    """

    def __init__(self, *, token: str | None = None, hold_seconds: float = 5.0) -> None:
        self.token = token  # when set, "Authorization: Bearer <token>" is required
        # How long "timeout" and "timeout_after_store" hold a request: longer than the client
        # waits, so that the client is the one that gives up. Stopping ends a hold at once.
        self.hold_seconds = hold_seconds
        self._lock = threading.Lock()
        self._script: deque[str] = deque()
        self._requests: list[RecordedRequest] = []
        self._stored: list[dict[str, Any]] = []
        self._stopping = threading.Event()
        self._httpd: LoopbackServer | None = None
        self._port = 0  # ephemeral at first; a restart binds the same port again

    def start(self) -> Self:
        """Serve (again, on the same port and with the same store, after ``stop``)."""
        self._stopping.clear()
        self._httpd = LoopbackServer(self, _Handler, self._port)
        self._port = self._httpd.server_address[1]
        self._httpd.serve_in_background()
        return self

    def stop(self) -> None:
        """Stop serving: held requests end at once and every open connection is closed."""
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.stop()
        self._httpd = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._port, "start FakeFhirServer first, or use it as a context manager"
        return f"http://127.0.0.1:{self._port}{BASE_PATH}"

    def script(self, *faults: str) -> None:
        """Apply ``faults`` to the next POSTs, in order; then POSTs succeed normally.

        An HTTP fault, "timeout" or "disconnect" strikes before authentication and validation,
        like a proxy in front of the EHR; "ok" and "timeout_after_store" go through both."""
        if unknown := set(faults) - FAULTS:
            raise ValueError(
                f"unknown fault(s) {sorted(unknown)}; expected some of {sorted(FAULTS)}"
            )
        with self._lock:
            self._script.extend(faults)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Copies of every recorded request, in arrival order."""
        with self._lock:
            return [replace(record, headers=dict(record.headers)) for record in self._requests]

    @property
    def stored(self) -> list[dict[str, Any]]:
        """Copies of the stored Bundles (with their server ``id`` and ``meta``), in order."""
        with self._lock:
            return copy.deepcopy(self._stored)

    def stored_identifiers(self) -> list[str]:
        with self._lock:
            return [bundle["identifier"]["value"] for bundle in self._stored]

    def count_for(self, identifier_value: str) -> int:
        return self.stored_identifiers().count(identifier_value)

    # -- serving -----------------------------------------------------------------------------

    def _handle(self, handler: _Handler, body: bytes) -> None:
        url = urlsplit(handler.path)
        post = handler.command == "POST"
        with self._lock:
            fault = (self._script.popleft() if self._script else "ok") if post else None
            record = RecordedRequest(
                method=handler.command,
                path=handler.path,
                headers={
                    k.lower(): v for k, v in handler.headers.items() if k.lower() != "authorization"
                },
                had_auth="Authorization" in handler.headers,
                identifier=_posted_identifier(body) if post else _searched_identifier(url),
                fault=fault,
            )
            self._requests.append(record)
        if fault in ("timeout", "disconnect"):
            if fault == "timeout":
                self._stopping.wait(self.hold_seconds)
            handler.drop_connection()
            return
        if fault in HTTP_FAULTS:
            status, code, diagnostics = HTTP_FAULTS[fault]
            retry_after = {"Retry-After": "1"} if status in (429, 503) else {}
            answer = outcome(status, code, diagnostics, retry_after)
        else:
            answer = self._route(handler, url, body)
        # Stored (or found): now be slower than the client. Answer late, unless stopped.
        stored = fault == "timeout_after_store" and answer[0] < 300
        if stored and self._stopping.wait(self.hold_seconds):
            handler.drop_connection()
            return
        with self._lock:
            record.status = answer[0]
        handler.send_json(answer)

    def _route(self, handler: _Handler, url: SplitResult, body: bytes) -> Answer:
        method = handler.command
        if method == "GET" and url.path == f"{BASE_PATH}/metadata":
            return 200, CAPABILITY_STATEMENT, {}
        sent = handler.headers.get("Authorization", "")
        if self.token is not None and not secrets.compare_digest(
            sent.encode(), f"Bearer {self.token}".encode()
        ):
            diagnostics = "Missing or wrong bearer token." if sent else "Authorization required."
            return outcome(401, "login", diagnostics, {"WWW-Authenticate": "Bearer"})
        if url.path != f"{BASE_PATH}/Bundle":
            return outcome(404, "not-supported", f"No route for {method} {url.path}.")
        if method == "GET":
            return 200, self._search(url), {}
        return self._create(handler, body)

    def _create(self, handler: _Handler, body: bytes) -> Answer:
        content_type = (handler.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != FHIR_JSON:
            return outcome(
                415, "not-supported", f"Content-Type must be {FHIR_JSON}, not {content_type!r}."
            )
        try:
            bundle = json.loads(body)
        except ValueError as exc:
            return outcome(400, "invalid", f"The body is not JSON: {exc}.")
        kind = bundle.get("resourceType") if isinstance(bundle, dict) else type(bundle).__name__
        if kind != "Bundle":
            return outcome(400, "invalid", f"Expected a Bundle resource, got {kind!r}.")
        identifier = bundle.get("identifier")
        if not isinstance(identifier, dict) or not all(
            isinstance(identifier.get(key), str) and identifier[key] for key in ("system", "value")
        ):
            return outcome(400, "required", "Bundle.identifier needs a system and a value.")
        condition = handler.headers.get("If-None-Exist")
        criteria = parse_qs(condition or "", keep_blank_values=True)
        if condition is not None and (
            list(criteria) != ["identifier"] or len(criteria["identifier"]) != 1
        ):
            return outcome(
                400,
                "not-supported",
                f"If-None-Exist must be identifier=SYSTEM|VALUE, not {condition!r}.",
            )
        with self._lock:
            if condition is not None:
                matches = [b for b in self._stored if _matches(b, criteria["identifier"][0])]
                if len(matches) > 1:
                    return outcome(412, "duplicate", f"{len(matches)} Bundles match {condition!r}.")
                if matches:
                    return 200, copy.deepcopy(matches[0]), self._location(matches[0])
            meta = {**bundle.get("meta", {}), "versionId": "1", "lastUpdated": _now()}
            stored = {**bundle, "id": str(len(self._stored) + 1), "meta": meta}
            self._stored.append(stored)
            return 201, copy.deepcopy(stored), self._location(stored)

    def _search(self, url: SplitResult) -> dict[str, Any]:
        wanted = parse_qs(url.query).get("identifier", [])
        with self._lock:
            found = [b for b in self._stored if all(_matches(b, token) for token in wanted)]
            entries = [{"fullUrl": self._url(b), "resource": copy.deepcopy(b)} for b in found]
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(found),
            "entry": entries,
        }

    def _url(self, bundle: dict[str, Any]) -> str:
        return f"{self.base_url}/Bundle/{bundle['id']}"

    def _location(self, bundle: dict[str, Any]) -> dict[str, str]:
        return {"Location": f"{self._url(bundle)}/_history/1", "ETag": 'W/"1"'}


def _matches(bundle: dict[str, Any], token: str) -> bool:
    """FHIR token search on Bundle.identifier: ``SYSTEM|VALUE``, ``|VALUE`` or ``VALUE``."""
    system, bar, value = token.partition("|")
    identifier: dict[str, str] = bundle["identifier"]
    if not bar:
        return identifier["value"] == token
    return identifier["value"] == value and identifier.get("system", "") == system


def _searched_identifier(url: SplitResult) -> str | None:
    values = parse_qs(url.query).get("identifier")
    return (values[0].partition("|")[2] or values[0]) if values else None


def _posted_identifier(body: bytes) -> str | None:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        value = json.loads(body).get("identifier", {}).get("value")
        return value if isinstance(value, str) else None
    return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
