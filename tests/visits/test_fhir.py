"""The note as a FHIR R4 document Bundle: from the web and the command line, validated by the
`fhir.resources` models, a draft preliminary and a signed note final with its legal attester."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from fhir.resources.R4B.bundle import Bundle

from tests.conftest import SAMPLE_VISIT, SHORT_VISIT
from tests.support.audit import AUDITED
from visits.notes.versions import note_sign
from visits.services import visit_create, visit_rerun_from, visit_start

# The pipeline runs inline, whose heartbeat needs committed rows.
pytestmark = pytest.mark.django_db(transaction=True)

XHTML = "{http://www.w3.org/1999/xhtml}div"
SECTION_CODES = [
    *("10154-3", "10164-2", "61150-9", "61149-1", "51848-0", "18776-5", "69730-0"),
    "59284-0",  # the consent to recording
]


@pytest.fixture
def visit(clinician):
    visit = visit_create(
        clinician=clinician, recording=SAMPLE_VISIT, patient_ref="Patient/42", encounter_ref="E-7"
    )
    visit_start(visit=visit, inline=True)
    return visit


def composition(document: dict) -> dict:
    first = document["entry"][0]["resource"]
    assert first["resourceType"] == "Composition"  # a document Bundle starts with it
    return first


def test_the_draft_is_a_valid_preliminary_progress_note_document(client, clinician, visit):
    client.force_login(clinician)

    response = client.get(reverse("visits:fhir", args=[visit.pk]))

    assert response.status_code == 200
    assert response["Content-Type"] == "application/fhir+json"
    assert response["Cache-Control"] == "private, no-store"
    body = response.content.decode()
    Bundle.model_validate_json(body)  # round-trips through the FHIR models
    document = json.loads(body)
    assert document["type"] == "document"
    assert document["identifier"]["value"] == f"visit-{visit.pk}-note-1"
    note = composition(document)
    assert note["status"] == "preliminary" and "attester" not in note
    assert note["type"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "11506-3",
        "display": "Progress note",
    }
    assert note["subject"] == {"reference": "Patient/42"}
    assert note["encounter"] == {"identifier": {"value": "E-7"}, "type": "Encounter"}
    assert [s["code"]["coding"][0]["code"] for s in note["section"]] == SECTION_CODES
    for section in note["section"]:
        div = ET.fromstring(section["text"]["div"])  # well-formed XHTML
        assert div.tag == XHTML
    reference = document["entry"][1]["resource"]
    assert reference["resourceType"] == "DocumentReference"
    assert reference["content"][0]["attachment"]["url"] == document["entry"][0]["fullUrl"]


def test_signed_it_is_final_with_a_legal_attester_and_the_same_identifier(client, clinician, visit):
    client.force_login(clinician)
    url = reverse("visits:fhir", args=[visit.pk])
    before = json.loads(client.get(url).content)
    note_sign(visit=visit, number=1, clinician=clinician)

    after = json.loads(client.get(url).content)

    note = composition(after)
    assert note["status"] == "final"
    (attester,) = note["attester"]
    assert attester["mode"] == "legal" and attester["party"]["display"] == clinician.username
    assert after["identifier"] == before["identifier"]
    assert after["entry"][0]["fullUrl"] == before["entry"][0]["fullUrl"]


def test_the_command_prints_any_version_and_refuses_an_unknown_one(clinician, visit):
    visit_rerun_from(visit=visit, stage="note", actor=None, reason="test", inline=True)

    def export(*args: str) -> dict:
        out = StringIO()
        call_command("fhir_export", str(visit.pk), *args, *AUDITED, stdout=out)
        return json.loads(out.getvalue())

    assert export()["identifier"]["value"] == f"visit-{visit.pk}-note-2"
    assert export("--note-version", "1")["identifier"]["value"] == f"visit-{visit.pk}-note-1"
    with pytest.raises(CommandError, match="no note version 5; versions: 1, 2"):
        export("--note-version", "5")
    with pytest.raises(CommandError, match="No visit with id 999"):
        call_command("fhir_export", "999", *AUDITED, stdout=StringIO())


def test_it_is_private_and_needs_a_note(client, clinician, other_clinician, visit):
    client.force_login(other_clinician)
    assert client.get(reverse("visits:fhir", args=[visit.pk])).status_code == 404

    waiting = visit_create(clinician=clinician, recording=SHORT_VISIT)
    client.force_login(clinician)
    response = client.get(reverse("visits:fhir", args=[waiting.pk]))
    assert response.status_code == 404
    assert "no note version" in response.json()["error"]
