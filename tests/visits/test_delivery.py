"""Delivering a signed note to the EHR (the `note_delivery` workflow), over real HTTP.

Every test signs a real note and lets the product's own HTTP client talk to `FakeFhirServer`
on the loopback: a first delivery, a flaky endpoint, a timeout after the EHR had in fact stored
the Bundle (the conditional create keeps it exactly-once), a closed port, a refusal that an
operator retries once the EHR is fixed, a bearer token that never leaks, an amendment, a
tampered signature. The last test does the same against a real django-q2 cluster."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.urls import reverse

from pipeline.core import executor
from pipeline.core.models import Attempt, AuditEntry, Run, RunStatus, Stage, StageStatus
from tests.conftest import SHORT_VISIT, requires_postgres
from tests.fakes.fhir_server import FakeFhirServer
from tests.support.audit import AUDITED
from tests.support.cluster import Cluster, wait_for
from visits.models import NoteVersion, Visit
from visits.notes.delivery import delivery_start
from visits.notes.fhir import IDENTIFIER_SYSTEM
from visits.notes.versions import ItemEdit, note_save, note_sign
from visits.schemas import DeliveryOutput
from visits.services import delivery_retry, visit_create, visit_start

# The stages run with a heartbeat on its own connection: rows must be committed for it.
pytestmark = pytest.mark.django_db(transaction=True)

DELIVERY = "note_delivery"
FHIR_JSON = "application/fhir+json"
FINAL = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)


# --- helpers ---------------------------------------------------------------------------------


def processed_visit(clinician) -> Visit:
    """A visit whose pipeline ran to the end here: its note's version 1 is the draft."""
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit, inline=True)
    visit.refresh_from_db()
    assert visit.current_run.status == RunStatus.SUCCEEDED
    return visit


def signed_visit(clinician) -> Visit:
    """A processed visit whose version 1 is signed (which starts a delivery when configured)."""
    visit = processed_visit(clinician)
    note_sign(visit=visit, clinician=clinician, number=1)
    return visit


def delivery_run(version: int = 1) -> Run:
    return Run.objects.get(workflow=DELIVERY, input__version=version)


def deliver_stage(run: Run) -> Stage:
    return Stage.objects.get(run=run, name="deliver")


def attempts(run: Run) -> list[Attempt]:
    return list(Attempt.objects.filter(stage__run=run).order_by("number"))


def identifier(visit: Visit, number: int = 1) -> str:
    return f"visit-{visit.pk}-note-{number}"


def composition(bundle: dict) -> dict:
    first = bundle["entry"][0]["resource"]
    assert first["resourceType"] == "Composition"
    return first


def status_json(visit: Visit) -> dict:
    out = StringIO()
    call_command("visit_status", str(visit.pk), "--json", *AUDITED, stdout=out)
    return json.loads(out.getvalue())


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- 1. the first delivery ---------------------------------------------------------------------


def test_a_signed_note_is_posted_once_as_a_conditional_create_and_reported(clinician, fhir_server):
    visit = signed_visit(clinician)
    run = delivery_run()
    assert run.subject == f"visit:{visit.pk}"
    assert run.input == {"visit": visit.pk, "version": 1}
    assert fhir_server.requests == []  # nothing is sent before the run is executed

    run = executor.run_execute_inline(run)

    assert run.status == RunStatus.SUCCEEDED
    [request] = fhir_server.requests
    assert request.method == "POST" and request.path == "/fhir/Bundle"
    assert request.status == 201
    assert request.headers["if-none-exist"] == (
        f"identifier={IDENTIFIER_SYSTEM}|{identifier(visit)}"
    )
    assert request.headers["content-type"] == FHIR_JSON
    assert request.headers["accept"] == FHIR_JSON
    assert not request.had_auth  # no token configured, none sent
    [bundle] = fhir_server.stored
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "document"
    assert bundle["identifier"] == {"system": IDENTIFIER_SYSTEM, "value": identifier(visit)}
    note = composition(bundle)
    assert note["status"] == "final"
    assert [a["mode"] for a in note["attester"]] == ["legal"]
    assert note["attester"][0]["party"] == {"display": clinician.get_username()}

    output = DeliveryOutput.model_validate(deliver_stage(run).output)
    assert output.identifier == identifier(visit)
    assert output.status_code == 201
    assert output.created is True
    assert output.location == f"{fhir_server.base_url}/Bundle/{bundle['id']}/_history/1"

    [delivery] = status_json(visit)["deliveries"]
    assert delivery["version"] == 1
    assert delivery["run"] == run.pk
    assert delivery["status"] == "succeeded"
    assert delivery["error"] is None
    assert delivery["location"] == output.location
    assert [(a["number"], a["status"]) for a in delivery["attempts"]] == [(1, "succeeded")]


# --- 2. a flaky endpoint -----------------------------------------------------------------------


def test_a_flaky_endpoint_is_retried_until_it_files_the_note_once(clinician, fhir_server):
    fhir_server.script("503", "503")
    visit = signed_visit(clinician)

    run = executor.run_execute_inline(delivery_run())

    assert run.status == RunStatus.SUCCEEDED
    made = attempts(run)
    assert [(a.number, a.status, a.error_code) for a in made] == [
        (1, "failed", "ehr_http_503"),
        (2, "failed", "ehr_http_503"),
        (3, "succeeded", ""),
    ]
    for attempt in made[:2]:
        assert "HTTP 503" in attempt.error_message
        assert "Injected fault: service unavailable." in attempt.error_message
    assert [r.status for r in fhir_server.requests] == [503, 503, 201]
    assert fhir_server.count_for(identifier(visit)) == 1
    assert len(fhir_server.stored) == 1
    doc = status_json(visit)["deliveries"][0]
    assert [a["status"] for a in doc["attempts"]] == ["failed", "failed", "succeeded"]
    assert doc["attempts"][0]["error_code"] == "ehr_http_503"


# --- 3. a timeout after the EHR stored the Bundle ----------------------------------------------


def test_a_timeout_after_the_ehr_stored_it_files_nothing_twice(clinician, fhir_server):
    fhir_server.script("timeout_after_store")
    visit = signed_visit(clinician)

    run = executor.run_execute_inline(delivery_run())

    assert run.status == RunStatus.SUCCEEDED
    first, second = attempts(run)
    assert (first.status, first.error_code) == ("failed", "ehr_timeout")
    assert "did not answer within 1 s" in first.error_message
    assert (second.status, second.error_code) == ("succeeded", "")
    # The retry carried the same condition; the server found the first Bundle and said so.
    assert [r.headers["if-none-exist"] for r in fhir_server.requests] == [
        f"identifier={IDENTIFIER_SYSTEM}|{identifier(visit)}"
    ] * 2
    assert fhir_server.requests[1].status == 200
    assert fhir_server.count_for(identifier(visit)) == 1
    output = DeliveryOutput.model_validate(deliver_stage(run).output)
    assert output.status_code == 200
    assert output.created is False
    assert output.location.endswith(f"/Bundle/{fhir_server.stored[0]['id']}/_history/1")


# --- 4. nobody listening -----------------------------------------------------------------------


def test_a_closed_port_is_a_transient_connection_error_and_delivery_resumes(
    clinician, fhir_server, settings
):
    # Attempt by attempt: a failed attempt leaves its retry to the caller (no inline wait).
    settings.PIPELINE_INLINE_RETRY_MAX_SECONDS = 0
    fhir_server.stop()  # the port is closed now; start() binds the same port again
    visit = signed_visit(clinician)
    run = delivery_run()
    stage = deliver_stage(run)

    executor.stage_execute(stage.pk)

    [attempt] = attempts(run)
    assert (attempt.status, attempt.error_code) == ("failed", "ehr_connection")
    assert "could not reach the EHR at" in attempt.error_message
    # It names the host, never the whole URL (which may carry credentials).
    host = settings.FHIR_BASE_URL.split("//")[1].split("/")[0]
    assert f"could not reach the EHR at {host}" in attempt.error_message
    assert settings.FHIR_BASE_URL not in attempt.error_message
    stage.refresh_from_db()
    assert stage.status == StageStatus.READY  # transient: waiting for its retry
    assert stage.failure_kind == ""
    assert stage.next_attempt_at is not None

    fhir_server.start()
    run = executor.run_execute_inline(run)

    assert run.status == RunStatus.SUCCEEDED
    assert [a.status for a in attempts(run)] == ["failed", "succeeded"]
    assert fhir_server.count_for(identifier(visit)) == 1


def test_a_port_nobody_ever_listened_on_is_ehr_connection(clinician, fhir_server, settings):
    settings.PIPELINE_INLINE_RETRY_MAX_SECONDS = 0
    settings.FHIR_BASE_URL = f"http://127.0.0.1:{closed_port()}/fhir"
    signed_visit(clinician)
    run = delivery_run()

    executor.stage_execute(deliver_stage(run).pk)

    [attempt] = attempts(run)
    assert (attempt.status, attempt.error_code) == ("failed", "ehr_connection")
    assert deliver_stage(run).status == StageStatus.READY
    run.refresh_from_db()
    assert run.status not in FINAL


# --- how each answer is judged -----------------------------------------------------------------

# fault -> (error code, retried?): 408/409/429/5xx, timeouts and dropped connections are worth
# another attempt; any other 4xx is the request's own fault.
FAULT_JUDGEMENTS = {
    "408": ("ehr_http_408", True),
    "409": ("ehr_http_409", True),
    "429": ("ehr_http_429", True),
    "500": ("ehr_http_500", True),
    "502": ("ehr_http_502", True),
    "503": ("ehr_http_503", True),
    "timeout": ("ehr_timeout", True),
    "disconnect": ("ehr_connection", True),
    "400": ("ehr_http_400", False),
    "401": ("ehr_http_401", False),
    "404": ("ehr_http_404", False),
    "422": ("ehr_http_422", False),
}


def test_each_kind_of_answer_is_retried_or_refused_as_the_policy_says(
    clinician, fhir_server, settings
):
    settings.PIPELINE_INLINE_RETRY_MAX_SECONDS = 0  # one attempt per stage_execute
    # At the suite's usual hundredth, the first backoff (0.1 s) can be over before the worker
    # looks, on a loaded machine, and a retry already due runs at once: keep it real-length.
    settings.PIPELINE_RETRY_INTERVAL_SCALE = 1.0
    visit = signed_visit(clinician)
    version = NoteVersion.objects.get(visit=visit, number=1)
    judged = {}
    # Signing started one delivery (left unrun); each fault gets a delivery run of its own.
    for fault in FAULT_JUDGEMENTS:
        fhir_server.script(fault)
        run = delivery_start(version)
        executor.stage_execute(deliver_stage(run).pk)
        [attempt] = attempts(run)
        stage = deliver_stage(run)
        retried = stage.status == StageStatus.READY
        assert retried or (stage.status, stage.failure_kind) == (StageStatus.FAILED, "permanent")
        judged[fault] = (attempt.error_code, retried)

    assert judged == FAULT_JUDGEMENTS
    assert fhir_server.stored == []


# --- 5. a refusal, fixed by the EHR, retried by an operator ------------------------------------


def test_a_refusal_is_permanent_at_once_and_an_operator_retry_delivers_it(clinician, fhir_server):
    fhir_server.script("422")
    visit = signed_visit(clinician)

    run = executor.run_execute_inline(delivery_run())

    assert run.status == RunStatus.FAILED
    stage = deliver_stage(run)
    assert stage.status == StageStatus.FAILED
    assert stage.failure_kind == "permanent"
    assert stage.error_code == "ehr_http_422"
    assert "Injected fault: unprocessable entity." in stage.error_message
    [attempt] = attempts(run)  # not retried: the request itself was refused
    assert attempt.error_code == "ehr_http_422"
    assert "HTTP 422" in attempt.error_message
    assert "Injected fault: unprocessable entity." in attempt.error_message
    assert fhir_server.stored == []
    doc = status_json(visit)["deliveries"][0]
    assert doc["status"] == "failed"
    assert "Injected fault: unprocessable entity." in doc["error"]

    delivery_retry(visit=visit, run_id=run.pk, actor=None, reason="EHR fixed the profile")
    run = executor.run_execute_inline(run)

    assert run.status == RunStatus.SUCCEEDED
    assert [(a.number, a.status) for a in attempts(run)] == [(1, "failed"), (2, "succeeded")]
    assert fhir_server.count_for(identifier(visit)) == 1
    [entry] = AuditEntry.objects.filter(run=run)
    assert entry.action == "retry"
    assert entry.stage == "deliver"
    assert entry.reason == "EHR fixed the profile"
    assert entry.actor is None and entry.actor_label


# --- 6. the bearer token -----------------------------------------------------------------------

TOKEN = "s3cret"  # a test credential for the loopback server


@pytest.fixture
def token_server(settings) -> Iterator[FakeFhirServer]:
    with FakeFhirServer(token=TOKEN, hold_seconds=3.0) as server:
        settings.FHIR_BASE_URL = server.base_url
        settings.FHIR_AUTH_TOKEN = TOKEN
        settings.FHIR_TIMEOUT_SECONDS = 1.0
        yield server


def debug_everywhere(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    # Loggers the settings quiet (or that might be) are opened up too.
    for name in ("httpx", "httpx2", "httpcore", "httpcore2", "pipeline", "visits", "django"):
        caplog.set_level(logging.DEBUG, logger=name)


def assert_token_nowhere(run: Run, caplog) -> None:
    for attempt in attempts(run):
        assert TOKEN not in attempt.error_message
        assert TOKEN not in attempt.traceback
        assert TOKEN not in attempt.worker
    stage = deliver_stage(run)
    assert TOKEN not in json.dumps(stage.output)
    assert TOKEN not in stage.error_message
    run.refresh_from_db()
    assert TOKEN not in run.error
    assert TOKEN not in json.dumps(run.input)
    for record in caplog.records:
        assert TOKEN not in record.getMessage(), record.name
        assert TOKEN not in repr(record.args), record.name
    assert TOKEN not in caplog.text  # formatted, tracebacks included


def test_the_bearer_token_is_sent_and_never_kept_or_logged(
    clinician, token_server, settings, caplog
):
    debug_everywhere(caplog)
    token_server.script("503")  # a failed attempt too: its error and traceback are kept
    visit = signed_visit(clinician)

    run = executor.run_execute_inline(delivery_run())

    assert run.status == RunStatus.SUCCEEDED
    assert [r.had_auth for r in token_server.requests] == [True, True]
    # The server checks the token on the request that stores: it matched.
    assert token_server.count_for(identifier(visit)) == 1
    assert [a.status for a in attempts(run)] == ["failed", "succeeded"]
    # The capture really was at DEBUG for the HTTP client (else the check below proves little).
    assert any(r.name.startswith("httpcore2") for r in caplog.records)
    assert_token_nowhere(run, caplog)
    assert TOKEN not in json.dumps(status_json(visit))


def test_a_wrong_token_is_a_permanent_401_that_does_not_echo_it(
    clinician, token_server, settings, caplog
):
    debug_everywhere(caplog)
    settings.FHIR_AUTH_TOKEN = "wrong-" + TOKEN
    signed_visit(clinician)

    run = executor.run_execute_inline(delivery_run())

    assert run.status == RunStatus.FAILED
    stage = deliver_stage(run)
    assert (stage.failure_kind, stage.error_code) == ("permanent", "ehr_http_401")
    assert "Missing or wrong bearer token." in stage.error_message
    assert token_server.stored == []
    assert_token_nowhere(run, caplog)
    assert "wrong-" not in caplog.text


# --- 7. an amendment ---------------------------------------------------------------------------


def test_an_amendment_is_delivered_as_its_own_amended_bundle(clinician, fhir_server):
    visit = signed_visit(clinician)
    assert executor.run_execute_inline(delivery_run(1)).status == RunStatus.SUCCEEDED
    plan = NoteVersion.objects.get(visit=visit, number=1).note.soap.plan
    edits = {
        "plan": [ItemEdit(index=i, text=item.text) for i, item in enumerate(plan)]
        + [ItemEdit(index=None, text="Recheck blood pressure in two weeks.")]
    }

    amended = note_save(
        visit=visit,
        clinician=clinician,
        base_number=1,
        edits=edits,
        reason="added the follow-up the patient agreed to",
    )
    assert amended.number == 2
    assert Run.objects.filter(workflow=DELIVERY).count() == 1  # saving alone sends nothing
    note_sign(visit=visit, clinician=clinician, number=2)
    second = delivery_run(2)
    assert second.input == {"visit": visit.pk, "version": 2}

    assert executor.run_execute_inline(second).status == RunStatus.SUCCEEDED

    assert fhir_server.stored_identifiers() == [identifier(visit, 1), identifier(visit, 2)]
    first_bundle, second_bundle = fhir_server.stored
    assert composition(first_bundle)["status"] == "final"
    note = composition(second_bundle)
    assert note["status"] == "amended"
    assert note["attester"][0]["mode"] == "legal"
    plan_of_care = next(s for s in note["section"] if s["title"] == "Plan of care")
    assert "Recheck blood pressure in two weeks." in plan_of_care["text"]["div"]
    reference = second_bundle["entry"][1]["resource"]
    assert reference["relatesTo"][0]["code"] == "replaces"
    assert reference["relatesTo"][0]["target"]["identifier"]["value"] == identifier(visit, 1)
    deliveries = status_json(visit)["deliveries"]
    assert [(d["version"], d["status"]) for d in deliveries] == [
        (1, "succeeded"),
        (2, "succeeded"),
    ]


# --- 8. no EHR configured ----------------------------------------------------------------------


def test_without_an_ehr_signing_starts_no_delivery(clinician, settings):
    settings.FHIR_BASE_URL = ""
    visit = signed_visit(clinician)

    assert NoteVersion.objects.get(visit=visit, number=1).is_signed
    assert not Run.objects.filter(workflow=DELIVERY).exists()
    assert status_json(visit)["deliveries"] == []


# --- 9. a tampered signed version --------------------------------------------------------------


def test_a_version_changed_after_signing_is_not_sent(clinician, fhir_server):
    visit = signed_visit(clinician)
    version = NoteVersion.objects.get(visit=visit, number=1)
    content = json.loads(json.dumps(version.content))
    content["soap"]["plan"].append({"text": "Tampered line.", "source": "clinician"})
    NoteVersion.objects.filter(pk=version.pk).update(content=content)
    assert not NoteVersion.objects.get(pk=version.pk).is_intact

    run = executor.run_execute_inline(delivery_run())

    assert run.status == RunStatus.FAILED
    stage = deliver_stage(run)
    assert (stage.failure_kind, stage.error_code) == ("permanent", "note_not_deliverable")
    assert "changed after it was signed" in stage.error_message
    assert len(attempts(run)) == 1  # not retried
    assert fhir_server.requests == []


# --- 10. the clinician's page and the admin ----------------------------------------------------


def test_the_visit_page_and_the_admin_show_the_delivery(
    clinician, fhir_server, client, django_user_model
):
    visit = signed_visit(clinician)
    run = executor.run_execute_inline(delivery_run())
    assert run.status == RunStatus.SUCCEEDED

    client.force_login(clinician)
    page = client.get(reverse("visits:detail", args=[visit.pk]))
    assert page.status_code == 200
    assert 'data-delivery-status="succeeded"' in page.content.decode()

    admin = django_user_model.objects.create_superuser(username="root", password="pw-root-12345!")
    client.force_login(admin)
    page = client.get(reverse("admin:visits_visit_change", args=[visit.pk]))
    assert page.status_code == 200
    text = page.content.decode()
    assert reverse("admin:pipeline_run_change", args=[run.pk]) in text
    assert DELIVERY in text
    assert f"Run {run.pk} ({DELIVERY})" in text
    assert "Retry failed delivery to the EHR" in text


# --- 11. a real cluster (PostgreSQL) -----------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path, fhir_server) -> Iterator[Cluster]:
    """A qcluster whose environment carries this test's FHIR settings (cluster_environment
    reads them from settings, which `fhir_server` has set)."""
    started = Cluster(tmp_path / "cluster.log").start()
    yield started
    started.kill()


@requires_postgres
@pytest.mark.cluster
def test_a_cluster_delivers_through_a_flaky_endpoint_exactly_once(
    clinician, fhir_server, cluster, settings
):
    assert cluster.env["FHIR_BASE_URL"] == fhir_server.base_url
    assert (
        float(cluster.env["PIPELINE_RETRY_INTERVAL_SCALE"])
        == settings.PIPELINE_RETRY_INTERVAL_SCALE
    )
    visit = processed_visit(clinician)
    fhir_server.script("503", "503")

    note_sign(visit=visit, clinician=clinician, number=1)  # enqueued on commit
    run = delivery_run()

    def finished() -> bool:
        run.refresh_from_db()
        return run.status in FINAL

    wait_for(finished, timeout=60, what="the delivery run to finish on the cluster")

    assert run.status == RunStatus.SUCCEEDED, cluster.log()
    made = attempts(run)
    assert [(a.number, a.status, a.error_code) for a in made] == [
        (1, "failed", "ehr_http_503"),
        (2, "failed", "ehr_http_503"),
        (3, "succeeded", ""),
    ]
    # The work happened in the cluster's worker processes, not in this one.
    assert all(not a.worker.endswith(f":{os.getpid()}") for a in made)
    assert {os.getpgid(int(a.worker.rsplit(":", 1)[1])) for a in made} == {cluster.process.pid}
    assert fhir_server.count_for(identifier(visit)) == 1
    assert len(fhir_server.stored) == 1
