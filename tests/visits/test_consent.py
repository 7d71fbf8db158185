"""No consent, no capture; consent withdrawn, nothing kept and nothing more sent.

The patient's consent to recording is asked before any capture (the recorder, the upload form,
`process_recording`), kept with who attested it and when, and shown in the audit trail, the
status document and the FHIR export. Withdrawn, during the visit or after it, the run is
cancelled through the engine and what was recorded is purged; the visit, the consent and the
trail stay."""

from __future__ import annotations

import json
import uuid
from io import StringIO

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.urls import reverse
from fhir.resources.R4B.bundle import Bundle

from pipeline import RunStatus, artifact_path
from tests.conftest import SAMPLE_VISIT, SHORT_VISIT
from visits.models import AccessEvent, RecordingConsent, Visit
from visits.privacy.consent import ConsentGiven, ConsentMissing, consent_withdraw
from visits.selectors import note_history, visit_stages, visit_status_document, visit_transcript
from visits.services import visit_create, visit_start

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def consent_asked(settings) -> None:
    settings.CONSENT_COLLECTED_ELSEWHERE = False


def actions(visit: Visit) -> list[str]:
    return list(
        AccessEvent.objects.filter(visit=visit).order_by("pk").values_list("action", flat=True)
    )


def test_without_consent_nothing_is_recorded_uploaded_or_processed(
    client, clinician, consent_asked
):
    client.force_login(clinician)

    record = client.post(
        reverse("visits:recording_start", args=[uuid.uuid4()]), {"mime": "audio/ogg"}
    )
    upload = client.post(
        reverse("visits:upload"),
        {"recording": SimpleUploadedFile("visit.mp3", SHORT_VISIT.read_bytes())},
    )
    with pytest.raises(CommandError, match="--consent verbal"):
        call_command("process_recording", str(SHORT_VISIT), stdout=StringIO())
    with pytest.raises(ConsentMissing):
        visit_create(clinician=clinician, recording=SHORT_VISIT)

    assert record.status_code == 400 and "consent" in record.json()["error"]
    assert upload.status_code == 400
    assert "Record the patient&#x27;s consent first" in upload.content.decode()
    assert not Visit.objects.exists()
    page = client.get(reverse("visits:upload"))
    assert b"data-recorder-consent" in page.content
    assert b'name="consent_method"' in page.content


def test_consent_given_on_the_form_is_kept_with_who_attested_it(client, clinician, consent_asked):
    client.force_login(clinician)

    response = client.post(
        reverse("visits:upload"),
        {
            "consent_method": "written",
            "others_present": "parent",
            "recording": SimpleUploadedFile("visit.mp3", SHORT_VISIT.read_bytes()),
        },
    )

    assert response.status_code == 302, response.content
    visit = Visit.objects.get()
    consent = RecordingConsent.objects.get(visit=visit)
    assert (consent.method, consent.attested_by, consent.others_present) == (
        "written",
        clinician,
        "parent",
    )
    assert actions(visit)[0] == AccessEvent.Action.CONSENT
    document = visit_status_document(visit)
    assert document.consent is not None
    assert (document.consent.method, document.consent.status) == ("written", "active")


def test_process_recording_takes_the_consent_on_its_command_line(clinician, consent_asked):
    out = StringIO()
    call_command("process_recording", str(SHORT_VISIT), "--consent", "verbal", "--json", stdout=out)

    document = json.loads(out.getvalue())
    assert document["consent"]["method"] == "verbal"
    assert document["consent"]["attested_by"] == "pipeline-cli"
    with pytest.raises(CommandError, match="invalid choice"):
        call_command("process_recording", str(SHORT_VISIT), "--consent", "nodded")


def test_a_practice_that_collects_consent_elsewhere_says_so_on_every_visit(clinician, settings):
    settings.CONSENT_COLLECTED_ELSEWHERE = True

    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)

    consent = RecordingConsent.objects.get(visit=visit)
    assert (consent.method, consent.attested_by) == ("elsewhere", None)


def test_withdrawal_while_recording_stops_the_run_and_deletes_the_pieces(client, clinician):
    client.force_login(clinician)
    session = uuid.uuid4()
    visit_id = client.post(
        reverse("visits:recording_start", args=[session]),
        {"mime": "audio/ogg", "consent_method": "verbal"},
    ).json()["visit"]
    for index in range(2):
        client.post(
            reverse("visits:recording_piece", args=[session, index]),
            data=SAMPLE_VISIT.read_bytes()[index * 1000 : (index + 1) * 1000],
            content_type="application/octet-stream",
        )
    visit = Visit.objects.get(pk=visit_id)
    pieces = artifact_path(visit.current_run.input["recording_pieces"])
    assert len(list(pieces.iterdir())) == 2

    response = client.post(
        reverse("visits:withdraw", args=[visit_id]), {"reason": "patient asked to stop"}
    )

    assert response.status_code == 302
    visit.refresh_from_db()
    assert visit.current_run.status == RunStatus.CANCELLED
    assert not pieces.exists()
    assert visit.purged_at is not None and visit.recording_stopped_at is not None
    assert not visit.consent.active and visit.consent.withdrawal_reason == "patient asked to stop"
    assert {AccessEvent.Action.WITHDRAW_CONSENT, AccessEvent.Action.PURGE} <= set(actions(visit))
    late = client.post(
        reverse("visits:recording_piece", args=[session, 2]),
        data=b"more",
        content_type="application/octet-stream",
    )
    assert late.status_code == 400
    live = client.get(reverse("visits:live_transcript", args=[visit_id])).json()
    assert live["state"] == "withdrawn" and live["segments"] == []
    page = client.get(reverse("visits:detail", args=[visit_id])).content.decode()
    assert "data-consent-withdrawn" in page and "Withdraw consent" not in page
    listed = client.get(reverse("visits:list")).content.decode()
    assert "consent withdrawn" in listed


def test_withdrawal_after_the_note_deletes_transcript_and_drafts_and_exports_inactive(
    client, clinician
):
    visit = visit_create(
        clinician=clinician,
        recording=SHORT_VISIT,
        patient_ref="Patient/42",
        consent=ConsentGiven(method="verbal", attested_by=clinician),
    )
    visit_start(visit=visit, inline=True)
    stages = visit_stages(visit)
    assert visit_transcript(stages) is not None
    transcript_file = artifact_path(
        next(s for s in stages if s.name == "transcribe").output["transcript"]
    )
    assert transcript_file.exists()
    draft_lines = note_history(visit)[-1].version.note.soap.sections()
    assert any(items for _, items in draft_lines)

    consent_withdraw(visit=visit, actor=clinician, reason="")

    visit.refresh_from_db()
    assert not transcript_file.exists() and visit.purged_at is not None
    (draft,) = note_history(visit)
    assert not any(items for _, items in draft.version.note.soap.sections())
    assert not draft.version.note.patient_summary
    client.force_login(clinician)
    exported = client.get(reverse("visits:fhir", args=[visit.pk]))
    bundle = json.loads(exported.content)
    Bundle.model_validate(bundle)
    (consent,) = [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Consent"
    ]
    assert consent["status"] == "inactive"
    assert consent["patient"] == {"reference": "Patient/42"}
    assert "end" in consent["provision"]["period"]
    with pytest.raises(Exception, match="already withdrawn"):
        consent_withdraw(visit=visit, actor=clinician, reason="again")


def test_only_the_visits_clinician_may_withdraw(client, clinician, other_clinician):
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    client.force_login(other_clinician)

    response = client.post(reverse("visits:withdraw", args=[visit.pk]))

    assert response.status_code == 404
    assert RecordingConsent.objects.get(visit=visit).active


def test_the_demos_generated_sample_is_recorded_as_synthetic_not_consented(settings):
    settings.DEBUG = True

    call_command("demo_setup", stdout=StringIO())

    consent = RecordingConsent.objects.get()
    assert (consent.method, consent.attested_by) == ("synthetic", None)
