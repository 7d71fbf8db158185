"""Every URL and admin action, asked by each kind of user, gets the answer it should.

One visit (its pipeline run once, with the offline engine) is asked for by: nobody signed in,
the clinician who owns it, another clinician, staff without permissions, on-call staff (may see
every visit and operate its pipeline), and a privacy officer (may read the audit trail, and
nothing else). The expected table is written out in full below, so a change of who may do what
shows as a changed cell in review."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from visits.models import AccessEvent, Visit

pytestmark = pytest.mark.django_db(transaction=True)

ROLES = ["anonymous", "owner", "other", "staff", "oncall", "privacy"]


@dataclass(frozen=True)
class Request:
    method: str
    url: Callable[[Visit], str]
    # A form, or a function of the visit for one that names it.
    data: dict[str, str] | Callable[[Visit], dict[str, str]] | None = None

    def form(self, visit: Visit) -> dict[str, str]:
        return self.data(visit) if callable(self.data) else self.data or {}


def _visit_url(name: str, **extra: object) -> Callable[[Visit], str]:
    return lambda visit: reverse(f"visits:{name}", kwargs={"visit_id": visit.pk, **extra})


def _url(name: str) -> Callable[[Visit], str]:
    return lambda visit: reverse(name)


def _admin(name: str, *args: object) -> Callable[[Visit], str]:
    return lambda visit: reverse(f"admin:{name}", args=[visit.pk, *args])


# What each asks, and what each role gets: a status code, or "login" for the redirect to the
# sign-in page, "back" for a redirect to the visit's page with a message saying why, "admin"
# for one to its admin page, "list" for one to the admin's list of visits.
LOGIN, BACK, LIST = "login", "back", "list"
PAGE = (LOGIN, 200, 404, 404, 200, 404)  # a visit's page: its owner and on-call staff only
ADMIN_OPS = (LOGIN, LOGIN, LOGIN, 403, 200, 403)  # the admin's visits: on-call staff only
AUDIT = (LOGIN, LOGIN, LOGIN, 403, 403, 200)  # the audit trail: the privacy officer only
EVERYONE = (LOGIN, 200, 200, 200, 200, 200)
GOVERNANCE = (LOGIN, LOGIN, LOGIN, 403, 403, 403)  # model policy and prices: superusers here
PUBLIC = (200, 200, 200, 200, 200, 200)
CSV_EXPORT = {"action": "export_csv", "select_across": "1", "index": "0", "_selected_action": "1"}
# fmt: off
# Answers in the order of ROLES: anonymous, owner, other, staff, oncall, privacy.
MATRIX: dict[str, tuple[Request, tuple[int | str, ...]]] = {
    "visit list": (Request("GET", lambda v: reverse("visits:list")), EVERYONE),
    "upload page": (Request("GET", lambda v: reverse("visits:upload")), EVERYONE),
    "visit page": (Request("GET", _visit_url("detail")), PAGE),
    "live fragment": (Request("GET", _visit_url("live")), PAGE),
    "recording": (Request("GET", _visit_url("recording")), PAGE),
    "history": (Request("GET", _visit_url("history")), PAGE),
    "note version": (Request("GET", _visit_url("note_version", number=1)), PAGE),
    "after-visit summary": (Request("GET", _visit_url("after_visit_summary")), PAGE),
    "FHIR export": (Request("GET", _visit_url("fhir")), PAGE),
    # Only the clinician edits, signs or corrects; on-call staff are told so on the page.
    "note edit page": (Request("GET", _visit_url("note_edit")), (LOGIN, 200, 404, 404, BACK, 404)),
    "change refs": (Request("POST", _visit_url("refs"), {"patient_ref": "MRN-9"}),
                    (LOGIN, BACK, 404, 404, BACK, 404)),
    "sign": (Request("POST", _visit_url("sign"), {"version": "1"}),
             (LOGIN, BACK, 404, 404, BACK, 404)),
    "dashboard": (Request("GET", lambda v: reverse("pipeline:dashboard")),
                  (LOGIN, 403, 403, 200, 200, 200)),
    "admin: visits": (Request("GET", lambda v: reverse("admin:visits_visit_changelist")),
                      ADMIN_OPS),
    "admin: visit page": (Request("GET", _admin("visits_visit_change")), ADMIN_OPS),
    "admin: retry form": (Request("GET", _admin("visits_visit_operate", "retry_failed_stage")),
                          ADMIN_OPS),
    "admin: run now form": (Request("GET", _admin("visits_visit_operate", "run_now")), ADMIN_OPS),
    "admin: re-run form": (Request("GET", _admin("visits_visit_operate", "rerun_from_stage")),
                           ADMIN_OPS),
    "admin: cancel form": (Request("GET", _admin("visits_visit_operate", "cancel")), ADMIN_OPS),
    "admin: retry delivery form": (Request("GET", _admin("visits_visit_operate", "retry_delivery")),
                                   ADMIN_OPS),
    # Purging needs visits.delete_visit, which nobody here has: on-call staff are told so.
    "admin: purge form": (Request("GET", _admin("visits_visit_operate", "purge_now")),
                          (LOGIN, LOGIN, LOGIN, 403, "admin", 403)),
    "admin: retry applied": (Request("POST", _admin("visits_visit_operate", "retry_failed_stage"),
                                     {"apply": "1", "reason": "checking access"}),
                             (LOGIN, LOGIN, LOGIN, 403, "admin", 403)),
    "admin: engine's run page": (Request("GET", lambda v: reverse("admin:pipeline_run_change",
                                                                  args=[v.current_run_id])),
                                 (LOGIN, LOGIN, LOGIN, 403, 403, 403)),
    **{
        f"admin: list action {action}": (
            Request("POST", lambda v: reverse("admin:visits_visit_changelist"),
                    lambda v, action=action: {"action": action, "index": "0",
                                              "_selected_action": str(v.pk)}),
            expected,
        )
        for action, expected in [
            ("retry_failed_stage", ADMIN_OPS), ("run_now", ADMIN_OPS),
            ("rerun_from_stage", ADMIN_OPS), ("cancel", ADMIN_OPS), ("retry_delivery", ADMIN_OPS),
            # Not offered to on-call staff without visits.delete_visit: back to the list.
            ("purge_now", (LOGIN, LOGIN, LOGIN, 403, LIST, 403)),
        ]
    },
    "admin: model policies": (Request("GET", _url("admin:pipeline_modelpolicy_changelist")),
                              GOVERNANCE),
    "admin: publish a policy": (Request("GET", _url("admin:pipeline_modelpolicy_add")),
                                GOVERNANCE),
    "admin: model prices": (Request("GET", _url("admin:pipeline_modelprice_changelist")),
                            GOVERNANCE),
    "admin: publish a price": (Request("GET", _url("admin:pipeline_modelprice_add")),
                               GOVERNANCE),
    # Metrics answer an allow-list of addresses (loopback here) or a token, not a user.
    "metrics": (Request("GET", _url("metrics")), PUBLIC),
    "healthz": (Request("GET", _url("healthz")), PUBLIC),
    "sign-in page": (Request("GET", _url("login")), PUBLIC),
    "second factor": (Request("GET", _url("second_factor")), EVERYONE),
    "admin: audit trail": (Request("GET", lambda v: reverse("admin:visits_accessevent_changelist")),
                           AUDIT),
    "admin: audit CSV": (Request("POST", lambda v: reverse("admin:visits_accessevent_changelist"),
                                 CSV_EXPORT), AUDIT),
}
# fmt: on


@pytest.fixture
def visit(finished_visit) -> Visit:
    return finished_visit


@pytest.fixture
def users(django_user_model, clinician, other_clinician) -> dict[str, object]:
    def staff(username: str, *codenames: str) -> object:
        user = django_user_model.objects.create_user(username=username, password="x", is_staff=True)
        user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
        return django_user_model.objects.get(pk=user.pk)

    return {
        "owner": clinician,
        "other": other_clinician,
        "staff": staff("staff_only"),
        "oncall": staff("oncall", "view_visit", "reprocess_visit"),
        "privacy": staff("privacy_officer", "view_audit"),
    }


def _answer(response, visit: Visit) -> int | str:
    if response.status_code == 302:
        location = response["Location"]
        if location.startswith(reverse("login")) or location.startswith(reverse("admin:login")):
            return LOGIN
        if location == reverse("visits:detail", args=[visit.pk]):
            return BACK
        if location == reverse("admin:visits_visit_change", args=[visit.pk]):
            return "admin"
        if location == reverse("admin:visits_visit_changelist"):
            return LIST
        return f"302 {location}"
    return response.status_code


def test_every_url_and_admin_action_answers_each_role_as_it_should(settings, users, visit):
    settings.FHIR_BASE_URL = ""

    seen: dict[str, tuple[int | str, ...]] = {}
    for name, (request, _) in MATRIX.items():
        answers = []
        for role in ROLES:
            client = Client()
            if role != "anonymous":
                client.force_login(users[role])
            send = client.get if request.method == "GET" else client.post
            answers.append(_answer(send(request.url(visit), request.form(visit)), visit))
        seen[name] = tuple(answers)

    assert seen == {name: expected for name, (_, expected) in MATRIX.items()}
    # Every refusal of a visit page is in the audit trail, with who asked.
    refused = AccessEvent.objects.filter(visit=visit, outcome=AccessEvent.Outcome.REFUSED)
    assert {event.actor_label for event in refused} >= {"dr_bob", "staff_only", "privacy_officer"}
