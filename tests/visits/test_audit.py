"""The audit trail: looks at PHI, changes, operations, sign-ins and refusals are recorded with
who, what, when, from where, why and the outcome; the trail cannot be changed; a privacy
officer can filter and export it; commands say on whose behalf and why."""

from __future__ import annotations

import csv
import getpass
import io
import time
from io import StringIO

import pytest
from django.contrib.auth.models import Permission
from django.core.exceptions import PermissionDenied
from django.core.management import CommandError, call_command
from django.db import DatabaseError, transaction
from django.urls import reverse

from config.session_policy import ACTIVE
from pipeline.core.states import RunStatus
from tests.conftest import SHORT_VISIT, is_postgres
from tests.support.audit import AUDITED
from tests.visits.test_note_versions import REASON, amend
from visits.models import AccessEvent, Visit
from visits.privacy.audit import audit_record, visit_viewers
from visits.services import visit_create, visit_retry, visit_start

# The pipeline runs inline, whose heartbeat needs committed rows.
pytestmark = pytest.mark.django_db(transaction=True)

Action, Outcome = AccessEvent.Action, AccessEvent.Outcome
BROWSER = "Mozilla/5.0 (audit test)"


@pytest.fixture(autouse=True)
def no_ehr(settings) -> None:
    settings.FHIR_BASE_URL = ""


@pytest.fixture
def visit(finished_visit) -> Visit:
    return finished_visit


def staff(django_user_model, username: str, *codenames: str):
    user = django_user_model.objects.create_user(username=username, password="x", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return django_user_model.objects.get(pk=user.pk)  # a fresh row: no cached permissions


def events(**filters) -> list[tuple]:
    return [
        (e.action, e.actor_label, e.note_version, e.outcome, e.detail)
        for e in AccessEvent.objects.filter(**filters).order_by("id")
    ]


def test_each_look_at_a_visit_is_recorded_with_where_from_and_polls_are_not(
    client, clinician, visit
):
    client.force_login(clinician)
    before = AccessEvent.objects.count()

    client.get(reverse("visits:detail", args=[visit.pk]), HTTP_USER_AGENT=BROWSER)
    for _ in range(3):
        client.get(reverse("visits:live", args=[visit.pk]))
    client.get(reverse("visits:note_version", args=[visit.pk, 1]))
    client.get(reverse("visits:history", args=[visit.pk]))
    client.get(reverse("visits:recording", args=[visit.pk]), HTTP_RANGE="bytes=0-99")
    client.get(reverse("visits:recording", args=[visit.pk]))

    assert AccessEvent.objects.count() == before + 5
    consent, *looks = events(visit=visit)
    assert consent[0] == Action.CONSENT  # recorded when the visit was created
    assert looks == [
        (Action.VIEW_VISIT, "dr_ada", None, Outcome.ALLOWED, ""),
        (Action.VIEW_NOTE, "dr_ada", 1, Outcome.ALLOWED, ""),
        (Action.VIEW_HISTORY, "dr_ada", None, Outcome.ALLOWED, ""),
        (Action.PLAY_RECORDING, "dr_ada", None, Outcome.ALLOWED, "bytes=0-99"),
        (Action.PLAY_RECORDING, "dr_ada", None, Outcome.ALLOWED, "whole file"),
    ]
    first = AccessEvent.objects.filter(visit=visit).exclude(action=Action.CONSENT).earliest("id")
    assert (first.actor, first.ip, first.user_agent, first.os_user) == (
        clinician,
        "127.0.0.1",
        BROWSER,
        "",
    )


def test_a_refused_look_is_recorded_with_who_asked(client, other_clinician, visit):
    client.force_login(other_clinician)

    assert client.get(reverse("visits:detail", args=[visit.pk])).status_code == 404
    assert client.get(reverse("visits:recording", args=[visit.pk])).status_code == 404
    assert client.get(reverse("visits:detail", args=[999999])).status_code == 404

    assert events(outcome=Outcome.REFUSED) == [
        (Action.VIEW_VISIT, "dr_bob", None, Outcome.REFUSED, "not this user's visit"),
        (Action.PLAY_RECORDING, "dr_bob", None, Outcome.REFUSED, "not this user's visit"),
        (Action.VIEW_VISIT, "dr_bob", None, Outcome.REFUSED, "there is no visit 999999"),
    ]
    assert AccessEvent.objects.filter(outcome=Outcome.REFUSED, visit=visit).count() == 2


def test_edits_signatures_and_amendments_are_recorded_with_version_and_reason(
    client, clinician, visit
):
    client.force_login(clinician)

    amend(client, visit)

    changes = AccessEvent.objects.filter(
        visit=visit, action__in=[Action.SIGN_NOTE, Action.EDIT_NOTE, Action.AMEND_NOTE]
    ).order_by("id")
    assert [(e.action, e.note_version, e.reason) for e in changes] == [
        (Action.SIGN_NOTE, 1, ""),
        (Action.AMEND_NOTE, 2, REASON),
        (Action.SIGN_NOTE, 2, REASON),
    ]
    assert all(e.actor == clinician and e.ip == "127.0.0.1" for e in changes)


def test_signing_in_failing_to_and_signing_out_are_recorded(client, clinician, settings):
    login = reverse("login")

    client.post(login, {"username": "dr_ada", "password": "wrong"}, HTTP_USER_AGENT=BROWSER)
    client.post(login, {"username": "=cmd|' /C calc'!A0", "password": "x"})
    client.post(login, {"username": "dr_ada", "password": "pw-ada-12345!"})
    client.post(reverse("logout"))

    assert events() == [
        (Action.LOGIN_FAILED, "dr_ada", None, Outcome.REFUSED, "wrong username or password"),
        (
            Action.LOGIN_FAILED,
            "=cmd|' /C calc'!A0",
            None,
            Outcome.REFUSED,
            "wrong username or password",
        ),
        (Action.LOGIN, "dr_ada", None, Outcome.ALLOWED, ""),
        (Action.LOGOUT, "dr_ada", None, Outcome.ALLOWED, ""),
    ]
    failed = AccessEvent.objects.filter(action=Action.LOGIN_FAILED).order_by("id").first()
    # A failed sign-in names what was typed, never links it to the account it names.
    assert (failed.actor, failed.ip, failed.user_agent) == (None, "127.0.0.1", BROWSER)


def test_too_many_wrong_passwords_pause_signing_in_and_the_lockout_is_recorded(
    client, clinician, other_clinician, settings
):
    login = reverse("login")
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert client.post(login, {"username": "dr_ada", "password": "guess"}).status_code == 200
    assert client.post(login, {"username": "dr_ada", "password": "guess"}).status_code == 429

    # The right password no longer helps, from this address, for the cool-off.
    paused = client.post(login, {"username": "dr_ada", "password": "pw-ada-12345!"})

    assert paused.status_code == 429
    assert "Signing in is paused" in paused.content.decode()
    assert "15 minutes" in paused.content.decode()
    assert "_auth_user_id" not in client.session
    # Four wrong passwords, the fifth that locked it out, the right one refused during it.
    assert [
        (e.action, e.actor_label, e.outcome, e.ip) for e in AccessEvent.objects.order_by("id")
    ] == [(Action.LOGIN_FAILED, "dr_ada", Outcome.REFUSED, "127.0.0.1")] * 4 + [
        (Action.LOCKOUT, "dr_ada", Outcome.REFUSED, "127.0.0.1")
    ] * 2
    # Another clinician at the same computer is not paused: the pair is, not the address.
    assert (
        client.post(login, {"username": "dr_bob", "password": "pw-bob-12345!"}).status_code == 302
    )


def test_an_idle_sign_out_is_recorded_with_why(client, clinician, settings):
    client.force_login(clinician)
    session = client.session
    session[ACTIVE] = time.time() - settings.SESSION_IDLE_MINUTES * 60 - 5
    session.save()

    client.get(reverse("visits:list"))

    (logout,) = AccessEvent.objects.filter(action=Action.LOGOUT)
    assert logout.detail == f"after {settings.SESSION_IDLE_MINUTES} minutes without activity"


def test_operations_are_recorded_and_a_refusal_for_want_of_permission_too(
    clinician, django_user_model, llm_server
):
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    llm_server.script("ok", "401")
    visit_start(visit=visit, inline=True)
    visit.refresh_from_db()
    assert visit.current_run.status == RunStatus.FAILED
    nobody = staff(django_user_model, "staff_only")
    oncall = staff(django_user_model, "oncall", "view_visit", "reprocess_visit")

    with pytest.raises(PermissionDenied):
        visit_retry(visit=visit, actor=nobody, reason="let me try")
    visit_retry(visit=visit, actor=oncall, reason="provider key rotated", inline=True)

    rows = AccessEvent.objects.filter(visit=visit, action=Action.RETRY).order_by("id")
    assert [(e.actor_label, e.outcome, e.reason, e.run_id) for e in rows] == [
        ("staff_only", Outcome.REFUSED, "", None),
        ("oncall", Outcome.ALLOWED, "provider key rotated", visit.current_run_id),
    ]


def test_commands_name_an_actor_and_a_reason_and_the_os_login_is_kept(clinician, visit):
    status = ("visit_status", str(visit.pk))
    with pytest.raises(CommandError, match="--actor, --reason"):
        call_command(*status, stdout=StringIO())
    with pytest.raises(CommandError, match="must not be empty"):
        call_command(*status, "--actor", " ", "--reason", "x", stdout=StringIO())
    assert not AccessEvent.objects.filter(action=Action.VIEW_STATUS).exists()

    call_command(*status, *AUDITED, stdout=StringIO())
    call_command(*status, "--actor", "dr_ada", "--reason", "chart review", stdout=StringIO())

    rows = AccessEvent.objects.filter(action=Action.VIEW_STATUS).order_by("id")
    assert [(e.actor, e.actor_label, e.os_user, e.reason, e.ip) for e in rows] == [
        (None, "test-operator", getpass.getuser(), "checked by the test suite", None),
        (clinician, "dr_ada", getpass.getuser(), "chart review", None),
    ]


@pytest.mark.skipif(not is_postgres(), reason="the append-only trigger is PostgreSQL's")
def test_the_database_refuses_to_change_or_delete_an_audit_row(clinician, visit):
    row = audit_record(Action.VIEW_VISIT, user=clinician, visit=visit)

    for change in (
        lambda: AccessEvent.objects.filter(pk=row.pk).update(actor_label="someone else"),
        lambda: AccessEvent.objects.filter(pk=row.pk).delete(),
    ):
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
            change()

    row.refresh_from_db()
    assert row.actor_label == "dr_ada"


def test_a_privacy_officer_filters_the_trail_and_exports_it_as_csv(
    client, django_user_model, clinician, other_clinician, visit
):
    audit_record(Action.VIEW_VISIT, user=clinician, visit=visit)
    audit_record(Action.VIEW_VISIT, user=other_clinician, visit=visit, refused="not theirs")
    audit_record(Action.LOGIN_FAILED, label="=HYPERLINK(1)", refused="wrong password")
    officer = staff(django_user_model, "privacy_officer", "view_audit")
    client.force_login(officer)
    url = reverse("admin:visits_accessevent_changelist")

    listing = client.get(url, {"q": str(visit.pk), "outcome__exact": "refused"})
    assert listing.status_code == 200
    assert list(listing.context["cl"].queryset) == list(
        AccessEvent.objects.filter(visit=visit, outcome=Outcome.REFUSED)
    )
    exported = client.post(
        url,
        {"action": "export_csv", "select_across": "1", "index": "0", "_selected_action": "1"},
    )

    assert exported["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.content.decode())))
    shown = [(r["action"], r["actor_label"], r["outcome"]) for r in rows]
    assert ("view_visit", "dr_bob", "refused") in shown
    assert ("view_visit", "dr_ada", "allowed") in shown
    # A typed name that looks like a formula is kept as text.
    assert ("login_failed", "'=HYPERLINK(1)", "refused") in shown
    # Nobody may change or delete the trail through the admin, a privacy officer included.
    row = AccessEvent.objects.filter(visit=visit).first()
    delete = client.post(reverse("admin:visits_accessevent_delete", args=[row.pk]), {"post": "yes"})
    assert delete.status_code == 403
    assert AccessEvent.objects.filter(pk=row.pk).exists()
    offered = [name for name, _ in listing.context["action_form"].fields["action"].choices]
    assert "export_csv" in offered and "delete_selected" not in offered


def test_who_viewed_visit_n_is_one_query(
    clinician, other_clinician, visit, django_assert_num_queries
):
    audit_record(Action.VIEW_VISIT, user=clinician, visit=visit)
    audit_record(Action.PLAY_RECORDING, user=other_clinician, visit=visit, refused="not theirs")
    audit_record(Action.SIGN_NOTE, user=clinician, visit=visit, version=1)

    with django_assert_num_queries(1):
        viewers = [(e.actor.username, e.action, e.outcome) for e in visit_viewers(visit)]

    assert viewers == [
        ("dr_bob", Action.PLAY_RECORDING, Outcome.REFUSED),
        ("dr_ada", Action.VIEW_VISIT, Outcome.ALLOWED),
    ]


def test_reading_a_visits_phi_in_the_engines_admin_is_recorded(
    client, admin_user, django_user_model, visit
):
    summarize = visit.current_run.stages.get(name="summarize")
    url = reverse("admin:pipeline_stage_change", args=[summarize.pk])
    # Pipeline view permissions without view_phi: the output is hidden, so nothing is read.
    viewer = staff(django_user_model, "engine_viewer", "view_run", "view_stage", "view_attempt")
    client.force_login(viewer)
    assert client.get(url).status_code == 200
    assert not AccessEvent.objects.filter(action=Action.VIEW_ADMIN).exists()

    client.force_login(admin_user)
    assert client.get(url).status_code == 200

    (event,) = AccessEvent.objects.filter(action=Action.VIEW_ADMIN)
    assert (event.visit, event.actor, event.detail) == (
        visit,
        admin_user,
        f"engine admin: stage {summarize.pk}",
    )
