"""The fake FHIR server, driven over real HTTP with httpx2 as the product's delivery drives it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest

from .fhir_server import FAULTS, FHIR_JSON, FakeFhirServer

SYSTEM = "urn:visit-pipeline:note-version"


@pytest.fixture
def server() -> Iterator[FakeFhirServer]:
    with FakeFhirServer(hold_seconds=2.0) as fake:
        yield fake


def bundle(value: str = "visit-1-note-1", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "document",
        "identifier": {"system": SYSTEM, "value": value},
        **extra,
    }


def post(
    server: FakeFhirServer,
    body: dict[str, Any] | None = None,
    *,
    conditional: bool = True,
    timeout: float = 5.0,
    **headers: str,
) -> httpx.Response:
    """POST a Bundle as the product does: conditional on its identifier unless told not to."""
    body = body or bundle()
    sent = {"Content-Type": FHIR_JSON, **{k.replace("_", "-"): v for k, v in headers.items()}}
    if conditional:
        identifier = body["identifier"]
        sent["If-None-Exist"] = f"identifier={identifier['system']}|{identifier['value']}"
    return httpx.post(f"{server.base_url}/Bundle", json=body, headers=sent, timeout=timeout)


def diagnostics(response: httpx.Response) -> str:
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "error"
    return str(outcome["issue"][0]["diagnostics"])


def test_conditional_create_stores_once_and_finds_it_again(server: FakeFhirServer) -> None:
    first, second = post(server), post(server)

    assert (first.status_code, second.status_code) == (201, 200)
    assert first.headers["Location"] == f"{server.base_url}/Bundle/1/_history/1"
    assert second.headers["Location"] == first.headers["Location"]
    assert first.json()["id"] == "1" and first.json()["meta"]["versionId"] == "1"
    assert second.json() == first.json() == server.stored[0]
    assert server.stored_identifiers() == ["visit-1-note-1"]
    assert [r.status for r in server.requests] == [201, 200]
    assert server.requests[0].headers["if-none-exist"] == f"identifier={SYSTEM}|visit-1-note-1"
    found = httpx.get(
        f"{server.base_url}/Bundle", params={"identifier": f"{SYSTEM}|visit-1-note-1"}
    )
    assert (found.json()["type"], found.json()["total"]) == ("searchset", 1)
    other = httpx.get(f"{server.base_url}/Bundle", params={"identifier": f"{SYSTEM}|other"})
    assert other.json()["total"] == 0


def test_without_if_none_exist_every_post_stores_a_copy(server: FakeFhirServer) -> None:
    first, second = post(server, conditional=False), post(server, conditional=False)

    assert (first.status_code, second.status_code) == (201, 201)
    assert first.headers["Location"] != second.headers["Location"]
    assert server.stored_identifiers() == ["visit-1-note-1", "visit-1-note-1"]
    assert server.count_for("visit-1-note-1") == 2
    # A conditional create now finds two: FHIR's answer is 412, and nothing more is stored.
    assert post(server).status_code == 412
    assert server.count_for("visit-1-note-1") == 2


def test_scripted_503_then_ok(server: FakeFhirServer) -> None:
    server.script("503", "ok")

    refused = post(server)
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "1"
    assert diagnostics(refused).startswith("Injected fault:")
    assert server.stored == []
    assert post(server).status_code == 201
    assert post(server).status_code == 200  # the script is spent: normal service
    assert [(r.fault, r.status) for r in server.requests] == [
        ("503", 503),
        ("ok", 201),
        ("ok", 200),
    ]


def test_timeout_after_store_then_conditional_retry_finds_it(server: FakeFhirServer) -> None:
    server.script("timeout_after_store")

    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        post(server, timeout=0.5)
    assert time.monotonic() - started < 1.5  # the client gave up; the server still holds
    assert server.count_for("visit-1-note-1") == 1  # ...but it had stored the Bundle
    retry = post(server, timeout=0.5)
    assert retry.status_code == 200
    assert retry.headers["Location"] == f"{server.base_url}/Bundle/1/_history/1"
    assert server.count_for("visit-1-note-1") == 1
    assert [r.fault for r in server.requests] == ["timeout_after_store", "ok"]


def test_other_content_types_are_refused_with_415(server: FakeFhirServer) -> None:
    response = httpx.post(f"{server.base_url}/Bundle", json=bundle())  # application/json

    assert response.status_code == 415
    assert FHIR_JSON in diagnostics(response)
    assert server.stored == []
    assert post(server, Content_Type=f"{FHIR_JSON}; charset=utf-8").status_code == 201


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"resourceType": "Patient", "identifier": {"system": SYSTEM, "value": "p"}}, "'Patient'"),
        ({"resourceType": "Bundle", "type": "document"}, "Bundle.identifier"),
        (bundle(identifier={"value": "no-system"}), "Bundle.identifier"),
    ],
)
def test_what_is_not_an_identified_bundle_is_refused_with_400(
    server: FakeFhirServer, body: dict[str, Any], said: str
) -> None:
    response = post(server, body, conditional=False)

    assert response.status_code == 400
    assert said in diagnostics(response)
    assert server.stored == []


def test_bearer_token_is_required_and_never_recorded() -> None:
    with FakeFhirServer(token="secret") as server:
        missing = post(server)
        wrong = post(server, Authorization="Bearer guess")
        right = post(server, Authorization="Bearer secret")

        assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 201)
        assert diagnostics(missing) and diagnostics(wrong)
        assert server.count_for("visit-1-note-1") == 1
        assert [r.had_auth for r in server.requests] == [False, True, True]
        assert all("authorization" not in r.headers for r in server.requests)
        assert "secret" not in repr(server.requests)
        assert httpx.get(f"{server.base_url}/metadata").status_code == 200  # public


def test_disconnect_is_a_transport_error_for_the_client(server: FakeFhirServer) -> None:
    server.script("disconnect")

    with pytest.raises(httpx.TransportError):
        post(server)
    assert server.stored == []
    assert server.requests[0].status is None
    assert post(server).status_code == 201


def test_stop_during_a_hold_returns_promptly_and_frees_the_client() -> None:
    server = FakeFhirServer(hold_seconds=30.0).start()
    server.script("timeout")
    errors: list[Exception] = []

    def send() -> None:
        try:
            post(server, timeout=20.0)
        except httpx.TransportError as exc:
            errors.append(exc)

    client = threading.Thread(target=send)
    client.start()
    deadline = time.monotonic() + 5
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    server.stop()
    client.join(timeout=5)

    assert time.monotonic() - started < 1.0
    assert not client.is_alive() and len(errors) == 1


def test_restart_keeps_the_port_and_the_store() -> None:
    with FakeFhirServer() as server:
        url = server.base_url
        assert post(server).status_code == 201
        server.stop()
        with pytest.raises(httpx.ConnectError):
            post(server)
        server.start()
        assert server.base_url == url
        assert post(server).status_code == 200


def test_metadata_and_unknown_faults(server: FakeFhirServer) -> None:
    metadata = httpx.get(f"{server.base_url}/metadata")
    assert metadata.json()["resourceType"] == "CapabilityStatement"
    assert {"ok", "timeout", "timeout_after_store", "disconnect", "429"} <= FAULTS
    with pytest.raises(ValueError, match="unknown fault"):
        server.script("ok", "418")
    assert post(server).status_code == 201  # a refused script queues nothing
