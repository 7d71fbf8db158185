"""Filing a signed note in the EHR: a second workflow on the same engine, `note_delivery`.

    deliver

One stage POSTs the version's FHIR document Bundle to `[FHIR_BASE_URL]/Bundle`. An EHR is
down for maintenance, rate-limits, or times out after it had in fact stored the Bundle; so the
stage is retried with backoff for about an hour, and the POST is a conditional create
(`If-None-Exist: identifier=...` on the Bundle's stable identifier), which makes a retry after
such a timeout file nothing twice. A refusal of the request itself (a 4xx other than 408, 409
and 429) is permanent, and the server's OperationOutcome text is kept on the attempt.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import httpx2 as httpx
from django.conf import settings

from pipeline import (
    OperationRefused,
    PermanentError,
    RetryPolicy,
    Run,
    StageContext,
    StageSpec,
    TransientError,
    Workflow,
    http_status_is_transient,
    retry_after_seconds,
    run_create,
    run_start,
)
from visits.models import NoteVersion, Visit, visit_subject
from visits.notes.fhir import (
    FHIR_JSON,
    IDENTIFIER_SYSTEM,
    note_bundle_json,
    note_identifier,
)
from visits.refs import DELIVER, NOTE_DELIVERY
from visits.schemas import DeliveryOutput
from visits.selectors import note_entry_pick

OUTCOME_MAX_CHARS = 500


class EhrUnavailable(TransientError):
    code = "ehr_unavailable"


class EhrRefused(PermanentError):
    code = "ehr_refused"


class NoteNotDeliverable(PermanentError):
    """The version cannot be sent as it is (not signed, or changed after it was signed)."""

    code = "note_not_deliverable"


def _outcome_text(response: httpx.Response) -> str:
    """What the server said: its OperationOutcome's diagnostics, else the body's start."""
    try:
        outcome = response.json()
        issues = outcome.get("issue", []) if isinstance(outcome, dict) else []
        said = "; ".join(
            str(issue.get("diagnostics") or issue.get("details", {}).get("text") or "")
            for issue in issues
            if isinstance(issue, dict)
        ).strip("; ")
    except (json.JSONDecodeError, AttributeError):
        said = ""
    return (said or response.text.strip() or "no explanation")[:OUTCOME_MAX_CHARS]


def deliver(ctx: StageContext) -> DeliveryOutput:
    """POST the signed version's Bundle, conditionally on its identifier."""
    visit = Visit.objects.select_related("clinician").get(pk=ctx.input["visit"])
    try:
        entry = note_entry_pick(visit, ctx.input["version"])
        if not entry.version.is_signed:
            raise OperationRefused(f"version {entry.version.number} is not signed")
        bundle = note_bundle_json(entry)
    except OperationRefused as exc:
        raise NoteNotDeliverable(f"The note is not sent: {exc}") from exc
    identifier = note_identifier(visit.pk, entry.version.number)
    headers = {
        "Content-Type": FHIR_JSON,
        "Accept": FHIR_JSON,
        "If-None-Exist": f"identifier={IDENTIFIER_SYSTEM}|{identifier}",
    }
    if settings.FHIR_AUTH_TOKEN:
        headers["Authorization"] = f"Bearer {settings.FHIR_AUTH_TOKEN}"
    url = f"{settings.FHIR_BASE_URL}/Bundle"
    try:
        response = httpx.post(
            url,
            content=bundle,
            headers=headers,
            timeout=settings.FHIR_TIMEOUT_SECONDS,
        )
    except httpx.TimeoutException as exc:
        raise EhrUnavailable(
            f"the EHR did not answer within {settings.FHIR_TIMEOUT_SECONDS:g} s; it may have "
            "stored the note, which the retry's conditional create will find",
            code="ehr_timeout",
        ) from exc
    except httpx.TransportError as exc:
        # The host only: a URL may carry credentials, and this message is stored.
        host = urlsplit(settings.FHIR_BASE_URL).netloc.rpartition("@")[2]
        raise EhrUnavailable(
            f"could not reach the EHR at {host} ({type(exc).__name__})", code="ehr_connection"
        ) from exc
    status = response.status_code
    if 200 <= status < 300:  # 201 created; 200 it had it already (the conditional create)
        return DeliveryOutput(
            identifier=identifier,
            status_code=status,
            created=status == 201,
            location=response.headers.get("Location", "")[:500],
        )
    if http_status_is_transient(status):
        raise EhrUnavailable(
            f"the EHR answered HTTP {status}: {_outcome_text(response)}",
            code=f"ehr_http_{status}",
            retry_after_seconds=retry_after_seconds(response.headers.get("Retry-After")),
        )
    raise EhrRefused(
        f"the EHR refused the note with HTTP {status}: {_outcome_text(response)}",
        code=f"ehr_http_{status}",
    )


NOTE_DELIVERY_WORKFLOW = Workflow(
    name=NOTE_DELIVERY,
    stages=(
        StageSpec(
            name=DELIVER.name,
            title="Deliver to the EHR",
            run=deliver,
            output=DELIVER.output,
            # Retried for about an hour: waits of 10 s doubling to 10 min, 12 attempts
            # (10+20+...+320 s, then 600 s five times: 3,630 s in all).
            policy=RetryPolicy(
                initial_interval_seconds=10,
                backoff_coefficient=2,
                maximum_interval_seconds=600,
                maximum_attempts=12,
                start_to_close_timeout_seconds=120,
                non_retryable_error_codes=(NoteNotDeliverable.code,),
            ),
        ),
    ),
)


def delivery_start(version: NoteVersion) -> Run:
    """Start delivering a signed version (its message leaves when the signature commits)."""
    run = run_create(
        workflow=NOTE_DELIVERY_WORKFLOW,
        subject=visit_subject(version.visit_id),
        input={"visit": version.visit_id, "version": version.number},
    )
    run_start(run)
    return run
