"""A session ends when idle (polling is not activity) or too old, and PHI pages are not cached."""

from __future__ import annotations

import time

import pytest
from django.urls import reverse

from config.session_policy import ACTIVE, STARTED
from tests.conftest import SHORT_VISIT
from visits.services import visit_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def visit(clinician):
    return visit_create(clinician=clinician, recording=SHORT_VISIT)


def aged(client, **seconds_ago: float) -> None:
    """Move the session's clocks back: started=..., active=... seconds ago."""
    session = client.session
    now = time.time()
    session[STARTED] = now - seconds_ago.get("started", 0)
    session[ACTIVE] = now - seconds_ago.get("active", 0)
    session.save()


def test_every_page_of_a_signed_in_user_is_no_store(client, clinician, visit):
    client.force_login(clinician)
    for url in (reverse("visits:list"), reverse("visits:detail", args=[visit.pk])):
        cache_control = client.get(url)["Cache-Control"]
        assert "no-store" in cache_control and "private" in cache_control, url


def test_an_idle_session_is_signed_out_and_sent_back_to_sign_in(client, clinician, visit, settings):
    settings.SESSION_IDLE_MINUTES = 15
    client.force_login(clinician)
    url = reverse("visits:detail", args=[visit.pk])
    assert client.get(url).status_code == 200
    aged(client, active=16 * 60)

    response = client.get(url)

    assert response.status_code == 302
    assert response["Location"] == f"{reverse('login')}?next=%2Fvisits%2F{visit.pk}%2F"
    assert "_auth_user_id" not in client.session
    page = client.get(response["Location"]).content.decode()
    assert "signed out after 15 minutes without activity" in page


def test_polling_neither_counts_as_activity_nor_keeps_an_idle_session(
    client, clinician, visit, settings
):
    settings.SESSION_IDLE_MINUTES = 15
    client.force_login(clinician)
    live = reverse("visits:live", args=[visit.pk])
    aged(client, active=10 * 60)
    before = client.session[ACTIVE]

    assert client.get(live, headers={"HX-Request": "true"}).status_code == 200
    assert client.session[ACTIVE] == before  # a poll is not activity

    aged(client, active=16 * 60)
    response = client.get(
        live,
        headers={"HX-Request": "true", "HX-Current-URL": f"http://testserver/visits/{visit.pk}/"},
    )
    # The whole page goes to the sign-in (not the fragment into the page).
    assert response["HX-Redirect"] == f"{reverse('login')}?next=%2Fvisits%2F{visit.pk}%2F"
    assert "_auth_user_id" not in client.session


def test_activity_extends_the_session_but_not_past_the_absolute_limit(
    client, clinician, visit, settings
):
    settings.SESSION_ABSOLUTE_HOURS = 12
    client.force_login(clinician)
    url = reverse("visits:list")
    aged(client, started=11 * 3600, active=5 * 60)
    assert client.get(url).status_code == 200
    assert time.time() - client.session[ACTIVE] < 5  # a person's request is activity

    aged(client, started=12 * 3600 + 1, active=0)
    response = client.get(url)
    assert response.status_code == 302 and "_auth_user_id" not in client.session
