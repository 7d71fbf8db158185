"""The patient's after-visit summary: plain language under the patient's four questions, its
reading grade for the clinician, printable, and marked DRAFT until the note is signed."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from tests.conftest import SAMPLE_VISIT, SHORT_VISIT
from visits.notes.versions import note_sign
from visits.selectors import after_visit_summary, note_history
from visits.services import visit_create, visit_start

# The pipeline runs inline, whose heartbeat needs committed rows.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def visit(clinician):
    visit = visit_create(clinician=clinician, recording=SAMPLE_VISIT, patient_ref="MRN-9")
    visit_start(visit=visit, inline=True)
    return visit


def test_the_plan_is_sorted_under_the_patients_questions(visit):
    (entry,) = note_history(visit)
    version = entry.version
    summary = after_visit_summary(version)

    plan = version.note.soap.plan
    # The patient's own lines, less those that only repeat a plan line (said once, there).
    repeats = [
        item
        for item in version.note.patient_summary
        if any(line.text.lower() in item.text.lower() for line in plan)
    ]
    assert repeats, "the offline engine's summary repeats the plan: the case under test"
    assert summary.found == [i for i in version.note.patient_summary if i not in repeats]
    assert sorted(map(str, summary.changed + summary.to_do + summary.come_back)) == sorted(
        map(str, plan)
    )  # every plan item once, none lost
    assert any("follow up" in item.text.lower() for item in summary.come_back)
    assert any("increase" in item.text.lower() for item in summary.changed)
    assert 0 < summary.reading_grade < 20
    assert summary.is_draft


def test_a_draft_prints_with_a_draft_mark_and_the_grade_for_the_clinician(client, clinician, visit):
    client.force_login(clinician)

    response = client.get(reverse("visits:after_visit_summary", args=[visit.pk]))

    page = response.content.decode()
    assert response.status_code == 200
    assert response["Cache-Control"] == "private, no-store"
    assert "DRAFT" in page and 'class="avs draft"' in page
    for heading in ("What we found", "What we changed", "What to do", "When to come back"):
        assert heading in page
    grade = float(re.search(r'data-reading-grade="([\d.-]+)"', page)[1])
    assert grade == pytest.approx(after_visit_summary(note_history(visit)[0].version).reading_grade)
    assert "MRN-9" in page


def test_once_signed_it_prints_as_final(client, clinician, visit):
    note_sign(visit=visit, number=1, clinician=clinician)
    client.force_login(clinician)

    page = client.get(reverse("visits:after_visit_summary", args=[visit.pk])).content.decode()

    assert "DRAFT" not in page
    assert f"Signed by {clinician.username}." in page


def test_it_is_private_and_needs_a_note(client, clinician, other_clinician, visit):
    client.force_login(other_clinician)
    assert client.get(reverse("visits:after_visit_summary", args=[visit.pk])).status_code == 404

    waiting = visit_create(clinician=clinician, recording=SHORT_VISIT)
    client.force_login(clinician)
    response = client.get(reverse("visits:after_visit_summary", args=[waiting.pk]), follow=True)
    assert "no note yet" in response.content.decode()
