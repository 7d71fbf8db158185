"""A visit may carry the EHR's opaque identifiers for its patient and encounter: given at upload
or on the command line, corrected by the clinician until the note is signed, never a name."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.exceptions import PermissionDenied
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.urls import reverse

from pipeline.core.errors import OperationRefused
from tests.conftest import SHORT_VISIT
from visits.errors import RecordingRejected
from visits.models import Visit
from visits.notes.versions import note_sign
from visits.services import (
    visit_create,
    visit_ref_validate,
    visit_refs_update,
    visit_start,
)

# One test runs the pipeline inline, whose heartbeat needs committed rows.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("value", ["MRN-004512", "Patient/123", "urn:oid:1.2.3|42", "  a_b.c  "])
def test_identifiers_are_accepted_and_stripped(value):
    assert visit_ref_validate(value, what="patient reference") == value.strip()


@pytest.mark.parametrize("value", ["Jane Roe", "Roe, Jane", "x" * 65, "née-42", "<script>"])
def test_names_and_free_text_are_refused_in_words(value):
    with pytest.raises(RecordingRejected, match="never a name"):
        visit_ref_validate(value, what="patient reference")


def test_the_upload_form_takes_the_refs_and_refuses_a_name(client, clinician):
    client.force_login(clinician)
    audio = SHORT_VISIT.read_bytes()

    refused = client.post(
        reverse("visits:upload"),
        {
            "patient_ref": "Jane Roe",
            "recording": SimpleUploadedFile("v.mp3", audio, content_type="audio/mpeg"),
        },
    )
    accepted = client.post(
        reverse("visits:upload"),
        {
            "patient_ref": "MRN-1",
            "encounter_ref": "Encounter/9",
            "recording": SimpleUploadedFile("v.mp3", audio, content_type="audio/mpeg"),
        },
    )

    assert refused.status_code == 400
    assert "never a name" in refused.content.decode()
    assert accepted.status_code == 302
    visit = Visit.objects.get()
    assert (visit.patient_ref, visit.encounter_ref) == ("MRN-1", "Encounter/9")


def test_process_recording_takes_the_refs_and_the_status_document_shows_them(clinician):
    out = StringIO()
    call_command(
        "process_recording",
        str(SHORT_VISIT),
        "--clinician",
        clinician.username,
        "--patient-ref",
        "MRN-77",
        "--encounter-ref",
        "E-5",
        "--json",
        stdout=out,
    )
    document = json.loads(out.getvalue())

    assert (document["patient_ref"], document["encounter_ref"]) == ("MRN-77", "E-5")
    with pytest.raises(CommandError, match="never a name"):
        call_command(
            "process_recording", str(SHORT_VISIT), "--patient-ref", "Jane Roe", stdout=StringIO()
        )


def test_the_clinician_corrects_the_refs_until_the_note_is_signed(
    client, clinician, other_clinician
):
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT, patient_ref="MRN-1")
    client.force_login(clinician)
    url = reverse("visits:refs", args=[visit.pk])

    client.post(url, {"patient_ref": "MRN-2", "encounter_ref": "E-1"})
    visit.refresh_from_db()
    assert (visit.patient_ref, visit.encounter_ref) == ("MRN-2", "E-1")

    response = client.post(url, {"patient_ref": "Jane Roe", "encounter_ref": ""}, follow=True)
    assert "never a name" in response.content.decode()
    visit.refresh_from_db()
    assert visit.patient_ref == "MRN-2"  # nothing half-saved

    with pytest.raises(PermissionDenied, match="Only the visit"):
        visit_refs_update(visit=visit, clinician=other_clinician, patient_ref="X", encounter_ref="")

    visit_start(visit=visit, inline=True)
    note_sign(visit=visit, number=1, clinician=clinician)
    with pytest.raises(OperationRefused, match="signed"):
        visit_refs_update(visit=visit, clinician=clinician, patient_ref="MRN-3", encounter_ref="")
    page = client.get(reverse("visits:detail", args=[visit.pk])).content.decode()
    assert "MRN-2" in page and "Save references" not in page
