"""A note version as a FHIR R4 document: a `Bundle` of type `document` holding the note's
`Composition` and a `DocumentReference` to it, built with (and validated by) the
`fhir.resources` models before it leaves.

The Bundle's `identifier` names the visit and the note version, so the same version always
yields the same identifier: what a receiving EHR can de-duplicate on.

| note part | Composition section (LOINC) |
|---|---|
| chief complaint (summary) | 10154-3 Chief complaint |
| history (summary) | 10164-2 History of present illness |
| SOAP subjective | 61150-9 Subjective |
| SOAP objective | 61149-1 Objective |
| SOAP assessment | 51848-0 Assessment |
| SOAP plan | 18776-5 Plan of care |
| patient summary | 69730-0 Instructions |
| consent to recording | 59284-0 Patient consent (and a `Consent` entry) |

The patient's consent to recording travels with every note as a `Consent` resource: `active`,
or `inactive` once withdrawn (its provision's period then ends at the withdrawal).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from django.utils import timezone
from django.utils.html import escape
from fhir.resources.R4B.bundle import Bundle

from pipeline import OperationRefused, stage_output
from visits.models import RecordingConsent, Visit
from visits.refs import SUMMARIZE
from visits.schemas import Finding, NoteItem
from visits.selectors import NoteEntry

LOINC = "http://loinc.org"
PROGRESS_NOTE = {"system": LOINC, "code": "11506-3", "display": "Progress note"}
IDENTIFIER_SYSTEM = "urn:visit-pipeline:note-version"
# A fixed namespace: the same visit and version give the same urn:uuid in every export.
_NAMESPACE = uuid.UUID("5b1c7f5e-2a47-4c55-9a8e-3f2d0c6b9e11")

FHIR_JSON = "application/fhir+json"


def note_identifier(visit_id: int, number: int) -> str:
    return f"visit-{visit_id}-note-{number}"


class NoteTampered(OperationRefused):
    code = "note_tampered"


class NoteUnresolved(OperationRefused):
    code = "note_unresolved"


def _urn(*parts: object) -> str:
    return f"urn:uuid:{uuid.uuid5(_NAMESPACE, ':'.join(map(str, parts)))}"


def _reference(ref: str, kind: str) -> dict[str, Any]:
    """`Patient/123` is a literal reference; anything else (an MRN) a logical one."""
    if ref.startswith(f"{kind}/"):
        return {"reference": ref}
    return {"identifier": {"value": ref}, "type": kind}


def _section(code: str, title: str, items: list[Finding] | list[NoteItem]) -> dict[str, Any]:
    listed = "".join(f"<li>{escape(item.text)}</li>" for item in items)
    div = (
        '<div xmlns="http://www.w3.org/1999/xhtml">'
        + (f"<ul>{listed}</ul>" if items else "<p>Nothing recorded.</p>")
        + "</div>"
    )
    section: dict[str, Any] = {
        "title": title,
        "code": {"coding": [{"system": LOINC, "code": code, "display": title}]},
        "text": {"status": "generated", "div": div},
    }
    if not items:
        section["emptyReason"] = {"text": "Nothing recorded in this visit."}
    return section


CONSENT_CATEGORY = {"system": LOINC, "code": "59284-0", "display": "Patient Consent"}


def consent_resource(visit: Visit, consent: RecordingConsent) -> dict[str, Any]:
    """The visit's consent to ambient recording as a FHIR `Consent` (R4B): an opt-in to
    collecting the visit's audio, attested by the clinician, inactive once withdrawn."""
    period: dict[str, str] = {"start": consent.attested_at.isoformat()}
    if consent.withdrawn_at is not None:
        period["end"] = consent.withdrawn_at.isoformat()
    resource: dict[str, Any] = {
        "resourceType": "Consent",
        "id": _urn(f"visit-{visit.pk}", "Consent").removeprefix("urn:uuid:"),
        "status": "active" if consent.active else "inactive",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                    "display": "Privacy Consent",
                }
            ]
        },
        "category": [
            {
                "coding": [CONSENT_CATEGORY],
                "text": f"Consent to ambient recording: {consent.get_method_display()}",
            }
        ],
        "dateTime": consent.attested_at.isoformat(),
        "policyRule": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
            ]
        },
        "verification": [{"verified": True, "verificationDate": consent.attested_at.isoformat()}],
        "provision": {
            "type": "permit",
            "period": period,
            "action": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/consentaction",
                            "code": "collect",
                        }
                    ],
                    "text": "record the visit's audio and transcribe it",
                }
            ],
        },
    }
    if consent.attested_by is not None:
        # Who recorded the consent; R4B's `performer` is who agrees, hence the display only.
        resource["performer"] = [{"display": consent.attested_by.get_username()}]
    if visit.patient_ref:
        resource["patient"] = _reference(visit.patient_ref, "Patient")
    return resource


def note_bundle(entry: NoteEntry, *, now: datetime | None = None) -> Bundle:
    """The FHIR document of one note version: `preliminary` while a draft, `final` when signed,
    `amended` when it replaced an earlier signed version. A signed version's document is the
    same at every export (its timestamp is the signature's), so an EHR can compare them."""
    version = entry.version
    visit = version.visit
    if not version.is_intact:
        raise NoteTampered(
            f"Version {version.number} of the note changed after it was signed: its stored "
            "content no longer matches its signature. It is not exported; tell your privacy "
            "officer."
        )
    unresolved = version.note.unsupported()
    if unresolved:
        raise NoteUnresolved(
            f"Version {version.number} has {len(unresolved)} line(s) stating a number or drug "
            "their evidence does not show. Correct, confirm or remove them first."
        )
    identifier = note_identifier(visit.pk, version.number)
    composition_url = _urn(identifier, "Composition")
    summarized = stage_output(version.run, SUMMARIZE)
    summary = summarized.summary if summarized else None
    note = version.note
    sections = []
    if summary is not None:
        complaint = [summary.chief_complaint] if summary.chief_complaint else []
        sections.append(_section("10154-3", "Chief complaint", complaint))
        sections.append(_section("10164-2", "History of present illness", summary.history))
    consent = RecordingConsent.objects.filter(visit=visit).select_related("attested_by").first()
    sections += [
        _section("61150-9", "Subjective", note.soap.subjective),
        _section("61149-1", "Objective", note.soap.objective),
        _section("51848-0", "Assessment", note.soap.assessment),
        _section("18776-5", "Plan of care", note.soap.plan),
        _section("69730-0", "Instructions", note.patient_summary),
    ]
    composition: dict[str, Any] = {
        "resourceType": "Composition",
        "id": composition_url.removeprefix("urn:uuid:"),
        "identifier": {"system": IDENTIFIER_SYSTEM, "value": identifier},
        "status": entry.fhir_status,
        "type": {"coding": [PROGRESS_NOTE]},
        "date": version.created_at.isoformat(),
        "author": [{"display": visit.clinician.get_username()}],
        "title": "Progress note",
        "section": sections,
    }
    consent_url = _urn(f"visit-{visit.pk}", "Consent")
    if consent is not None:
        state = "given" if consent.active else f"withdrawn {consent.withdrawn_at:%Y-%m-%d %H:%M}"
        section = _section(CONSENT_CATEGORY["code"], "Consent to recording", [])
        section.pop("emptyReason")
        section["text"]["div"] = (
            '<div xmlns="http://www.w3.org/1999/xhtml"><p>'
            + escape(f"{consent.get_method_display()}; {state}")
            + "</p></div>"
        )
        section["entry"] = [{"reference": consent_url}]
        sections.append(section)
    if visit.patient_ref:
        composition["subject"] = _reference(visit.patient_ref, "Patient")
    if visit.encounter_ref:
        composition["encounter"] = _reference(visit.encounter_ref, "Encounter")
    if version.signed_by and version.signed_at:
        composition["attester"] = [
            {
                "mode": "legal",
                "time": version.signed_at.isoformat(),
                "party": {"display": version.signed_by.get_username()},
            }
        ]
    document_reference: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": _urn(identifier, "DocumentReference").removeprefix("urn:uuid:"),
        "status": "superseded" if entry.superseded_by is not None else "current",
        "docStatus": composition["status"],
        "type": {"coding": [PROGRESS_NOTE]},
        "content": [{"attachment": {"contentType": FHIR_JSON, "url": composition_url}}],
    }
    if entry.amends is not None:
        replaced = note_identifier(visit.pk, entry.amends)
        document_reference["relatesTo"] = [
            {
                "code": "replaces",
                "target": {"identifier": {"system": IDENTIFIER_SYSTEM, "value": replaced}},
            }
        ]
    if "subject" in composition:
        document_reference["subject"] = composition["subject"]
    timestamp = version.signed_at or now or timezone.now()
    return Bundle.model_validate(
        {
            "resourceType": "Bundle",
            "identifier": {"system": IDENTIFIER_SYSTEM, "value": identifier},
            "type": "document",
            "timestamp": timestamp.isoformat(),
            "entry": [
                {"fullUrl": composition_url, "resource": composition},
                {
                    "fullUrl": _urn(identifier, "DocumentReference"),
                    "resource": document_reference,
                },
                *(
                    [{"fullUrl": consent_url, "resource": consent_resource(visit, consent)}]
                    if consent is not None
                    else []
                ),
            ],
        }
    )


def note_bundle_json(entry: NoteEntry) -> str:
    return note_bundle(entry).model_dump_json(exclude_none=True, indent=2)
