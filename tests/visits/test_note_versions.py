"""Note versions across runs, their difference, and signing."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from tests.conftest import SHORT_VISIT
from visits.models import NoteSignature
from visits.selectors import note_diff, visit_note_versions
from visits.services import visit_create, visit_rerun_from, visit_start

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def operator(django_user_model):
    user = django_user_model.objects.create_user(username="oncall", password="x", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["reprocess_visit", "view_visit"])
    )
    return django_user_model.objects.get(pk=user.pk)


def test_a_rerun_makes_a_new_version_and_leaves_the_signed_one_alone(
    client, clinician, operator, settings, llm_server
):
    settings.OPENAI_API_KEY = ""  # first version from the offline engine
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit, inline=True)
    visit.refresh_from_db()
    first_run = visit.current_run_id
    client.force_login(clinician)
    response = client.post(reverse("visits:sign", args=[visit.pk]), {"run": first_run})
    assert response.status_code == 302
    signature = NoteSignature.objects.get()

    settings.OPENAI_API_KEY = "test-key"  # the second version from the (fake) model
    visit_rerun_from(visit=visit, stage="note", actor=operator, reason="try the model", inline=True)
    visit.refresh_from_db()

    versions = visit_note_versions(visit)
    assert [(v.run_id, v.is_current, v.signed_by) for v in versions] == [
        (first_run, False, "dr_ada"),
        (visit.current_run_id, True, None),
    ]
    assert NoteSignature.objects.get() == signature  # untouched by the re-run
    diff = note_diff(versions[0], versions[1])
    assert any(mark == "-" and "ibuprofen" in line.lower() for mark, line in diff)
    assert any(mark == "+" and line == "  - stub" for mark, line in diff)
    assert (" ", "SUBJECTIVE") in diff

    page = client.get(
        reverse("visits:detail", args=[visit.pk]),
        {"compare": first_run, "to": visit.current_run_id},
    )
    text = page.content.decode()
    assert page.status_code == 200
    assert f"Run {first_run} → run {visit.current_run_id}" in text
    assert 'class="removed"' in text and 'class="added"' in text
    assert "Sign this note" in text  # the new version is a draft again


def test_only_the_visits_clinician_can_sign_and_only_once(client, clinician, operator):
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit, inline=True)
    visit.refresh_from_db()
    url = reverse("visits:sign", args=[visit.pk])

    client.force_login(operator)  # staff who may see the visit, but it is not theirs
    client.post(url, {"run": visit.current_run_id})
    assert not NoteSignature.objects.exists()

    client.force_login(clinician)
    client.post(url, {"run": visit.current_run_id})
    response = client.post(url, {"run": visit.current_run_id}, follow=True)
    assert NoteSignature.objects.count() == 1
    assert "already signed" in response.content.decode()
    refused = client.post(url, {"run": "not-a-number"}, follow=True)
    assert "Choose a version of the note to sign." in refused.content.decode()
    assert client.get(url).status_code == 405
