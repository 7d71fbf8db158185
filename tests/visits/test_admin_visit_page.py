"""The admin's visit page: the pipeline of every run, stage and attempt, and the operations."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import constants as message_levels
from django.test import Client
from django.urls import reverse

from pipeline.core.models import Attempt, AuditEntry, Run, Stage
from pipeline.core.states import FailureKind, RunStatus, StageStatus
from pipeline.core.store import run_create
from tests.conftest import SHORT_VISIT
from visits.admin import OPERATIONS, RUNS_IN_DETAIL
from visits.models import Visit
from visits.services import visit_create, visit_rerun_from, visit_start
from visits.stages import VISIT_WORKFLOW

# The heartbeat thread has its own connection: rows must be committed for it to see them.
pytestmark = pytest.mark.django_db(transaction=True)

# Measured: session, user, the visit, its runs, the clinician and the current run of the
# read-only fields, the content type of the "history" link (cached after a first page), and two
# queries (stages, their attempts) for each run shown in detail, whatever its attempts; and the
# audit trail's row saying who looked.
QUERIES_BASE = 8
QUERIES_PER_RUN = 2


def change_url(visit: Visit) -> str:
    return reverse("admin:visits_visit_change", args=[visit.pk])


def operate_url(visit: Visit, action: str) -> str:
    return reverse("admin:visits_visit_operate", args=[visit.pk, action])


def page_messages(response: Any) -> list[tuple[int, str]]:
    return [(m.level, m.message) for m in response.context["messages"]]


@pytest.fixture
def operator(django_user_model):
    user = django_user_model.objects.create_user(username="oncall", password="x", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["reprocess_visit", "view_visit"])
    )
    return django_user_model.objects.get(pk=user.pk)  # fresh permission cache


@pytest.fixture
def viewer(django_user_model):
    """Staff who may look at visits but not operate their pipeline."""
    user = django_user_model.objects.create_user(username="viewer", password="x", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_visit"))
    return django_user_model.objects.get(pk=user.pk)


def processed_visit(clinician, llm_server, *faults: str) -> Visit:
    """A visit processed here to the end, the LLM answering with `faults` in order."""
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    llm_server.script(*faults)
    visit_start(visit=visit, inline=True)
    visit.refresh_from_db()
    return visit


def failed_at_note(clinician, llm_server) -> Visit:
    """The note stage: a 500 (retried), then a refused key (permanent). Two attempts."""
    visit = processed_visit(clinician, llm_server, "ok", "500", "401")
    assert visit.current_run.status == RunStatus.FAILED
    return visit


def test_the_page_shows_every_stage_and_every_attempt_with_its_traceback(
    admin_client, clinician, llm_server, django_assert_max_num_queries
):
    visit = failed_at_note(clinician, llm_server)

    with django_assert_max_num_queries(QUERIES_BASE + QUERIES_PER_RUN):
        page = admin_client.get(change_url(visit))

    assert page.status_code == 200
    text = page.content.decode()
    for name in VISIT_WORKFLOW.stage_names:
        assert f"<td><strong>{name}</strong></td>" in text
    attempts = Attempt.objects.filter(stage__run=visit.current_run).order_by(
        "stage__position", "number"
    )
    assert text.count('<tr class="vp-attempt">') == len(attempts) == 5
    for attempt in attempts:
        duration = f"{(attempt.finished_at - attempt.started_at).total_seconds():.2f} s"
        assert duration in text
        assert attempt.worker in text
    summarize = attempts.get(stage__name="summarize")
    assert summarize.input_tokens > 0
    assert f"<td>{summarize.input_tokens}</td>" in text
    assert f"<td>{summarize.output_tokens}</td>" in text
    assert f"${summarize.cost_usd}" in text
    note = Stage.objects.get(run=visit.current_run, name="note")
    assert note.failure_kind == FailureKind.PERMANENT
    assert FailureKind.PERMANENT.label in text
    assert "llm_http_500" in text and "llm_http_401" in text
    # Each failed attempt's traceback, folded away.
    tracebacks = re.findall(
        r'<details class="vp-traceback"><summary>traceback</summary><pre>(.*?)</pre></details>',
        text,
        re.DOTALL,
    )
    assert len(tracebacks) == 2
    assert all(t.startswith("Traceback (most recent call last)") for t in tracebacks)
    # The current run, and the operations for this visit.
    assert f'<h3 id="run-{visit.current_run_id}">Current run:' in text
    for name in OPERATIONS:
        assert f'action="{operate_url(visit, name)}"' in text
    assert 'name="csrfmiddlewaretoken"' in text


def test_a_stage_that_ran_out_of_attempts_says_it_gave_up(admin_client, clinician, llm_server):
    visit = processed_visit(clinician, llm_server, "ok", *["500"] * 6)
    note = Stage.objects.get(run=visit.current_run, name="note")
    assert note.failure_kind == FailureKind.EXHAUSTED and note.attempt_count == 6

    text = admin_client.get(change_url(visit)).content.decode()

    assert FailureKind.EXHAUSTED.label in text
    assert text.count('<tr class="vp-attempt">') == 3 + 6
    assert text.count('<details class="vp-traceback">') == 6


def test_runs_are_listed_newest_first_with_the_fork_linked_to_its_origin(
    admin_client, clinician, operator, llm_server, django_assert_max_num_queries
):
    visit = processed_visit(clinician, llm_server)
    old = visit.current_run
    visit_rerun_from(
        visit=visit, stage="summarize", actor=operator, reason="new prompt", inline=True
    )
    visit.refresh_from_db()
    new = visit.current_run
    assert new.forked_from_id == old.pk and new.status == RunStatus.SUCCEEDED

    with django_assert_max_num_queries(QUERIES_BASE + 2 * QUERIES_PER_RUN):
        page = admin_client.get(change_url(visit))

    text = page.content.decode()
    old_link = reverse("admin:pipeline_run_change", args=[old.pk])
    new_link = reverse("admin:pipeline_run_change", args=[new.pk])
    start = text.index('<table id="visit-runs">')
    runs_table = text[start : text.index("</table>", start)]
    assert runs_table.index(new_link) < runs_table.index(old_link)  # newest first
    assert f'<a href="{new_link}">run {new.pk}</a> <strong>(current)</strong>' in runs_table
    assert (
        f'forked from <a href="{old_link}">run {old.pk}</a> at stage <code>summarize</code>'
        in runs_table
    )
    assert f're-run as <a href="{new_link}">run {new.pk}</a>' in runs_table
    # The current run in full; the old one folded, with all its stages and attempts.
    assert f'<h3 id="run-{new.pk}">Current run:' in text
    assert f'<details class="vp-run" id="run-{old.pk}">' in text
    for name in ("ingest", "transcribe"):
        assert f"Output reused from stage {name} of run {old.pk}; not run again." in text
    assert text.count('<tr class="vp-attempt">') == 4 + 2  # the old run's, the fork's own
    assert text.count('<span class="vp-status succeeded">Succeeded</span>') >= 2 * (4 + 4)


def test_a_visit_with_many_runs_shows_the_newest_in_detail_and_lists_the_rest(
    admin_client, clinician, django_assert_max_num_queries
):
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    first = visit.current_run
    extra = RUNS_IN_DETAIL + 4
    for _ in range(extra):
        run_create(workflow=VISIT_WORKFLOW, subject=visit.subject, input={})
    # The current run is the oldest here: it is shown in detail all the same, after the newest.
    with django_assert_max_num_queries(QUERIES_BASE + (RUNS_IN_DETAIL + 1) * QUERIES_PER_RUN):
        page = admin_client.get(change_url(visit))

    text = page.content.decode()
    assert text.count("stages on its own page") == extra + 1 - RUNS_IN_DETAIL - 1
    assert text.count('<details class="vp-run"') == RUNS_IN_DETAIL
    assert f'<h3 id="run-{first.pk}">Current run:' in text
    for run in Run.objects.filter(subject=visit.subject):
        assert reverse("admin:pipeline_run_change", args=[run.pk]) in text


def test_the_retry_button_asks_for_a_reason_then_retries_and_audits(
    admin_client, admin_user, clinician, llm_server
):
    visit = failed_at_note(clinician, llm_server)
    url = operate_url(visit, "retry_failed_stage")

    form = admin_client.post(url)
    assert form.status_code == 200
    assert form.templates[0].name == "admin/visits/operate.html"
    assert b"Kept in the audit trail" in form.content
    assert f'href="{change_url(visit)}"'.encode() in form.content  # "Back" to the visit

    again = admin_client.post(url, {"apply": "1", "reason": "  "})
    assert again.status_code == 200 and b"This field is required." in again.content
    assert not AuditEntry.objects.exists()

    done = admin_client.post(url, {"apply": "1", "reason": "provider key rotated"}, follow=True)
    assert done.redirect_chain == [(change_url(visit), 302)]
    assert page_messages(done) == [
        (message_levels.SUCCESS, "Retry failed stage: done for 1 visit(s).")
    ]
    entry = AuditEntry.objects.get()
    assert (entry.action, entry.actor, entry.run_id, entry.stage, entry.reason) == (
        "retry",
        admin_user,
        visit.current_run_id,
        "note",
        "provider key rotated",
    )
    note = Stage.objects.get(run=visit.current_run, name="note")
    assert note.status == StageStatus.READY  # enqueued for the cluster, not run here


def test_the_rerun_button_asks_for_the_stage_and_makes_the_fork_current(
    admin_client, clinician, llm_server
):
    visit = failed_at_note(clinician, llm_server)
    url = operate_url(visit, "rerun_from_stage")
    assert b'name="stage"' in admin_client.post(url).content

    done = admin_client.post(url, {"apply": "1", "stage": "summarize", "reason": "new prompt"})

    assert done.status_code == 302
    visit.refresh_from_db()
    assert visit.current_run.forked_from_id is not None
    entry = AuditEntry.objects.get()
    assert (entry.action, entry.new_run_id, entry.stage) == (
        "rerun",
        visit.current_run_id,
        "summarize",
    )


def test_a_refused_operation_is_a_warning_on_the_page_not_an_error(
    admin_client, clinician, llm_server
):
    visit = failed_at_note(clinician, llm_server)

    for action, refusal in (
        ("cancel", "nothing to cancel"),
        ("run_now", "no stage waiting for a retry"),
    ):
        done = admin_client.post(
            operate_url(visit, action), {"apply": "1", "reason": "x"}, follow=True
        )
        assert done.status_code == 200
        ((level, message),) = page_messages(done)
        assert level == message_levels.WARNING and refusal in message, message
    assert not AuditEntry.objects.exists()
    assert admin_client.post(operate_url(visit, "delete_selected")).status_code == 404


def test_staff_without_the_reprocess_permission_see_the_pipeline_but_no_buttons(
    client, clinician, viewer, llm_server
):
    visit = failed_at_note(clinician, llm_server)
    client.force_login(viewer)

    page = client.get(change_url(visit))

    assert page.status_code == 200
    text = page.content.decode()
    assert 'id="visit-pipeline"' in text and "llm_http_401" in text
    assert 'id="visit-operations"' not in text and "/operate/" not in text

    forced = client.post(
        operate_url(visit, "retry_failed_stage"), {"apply": "1", "reason": "x"}, follow=True
    )
    assert forced.redirect_chain == [(change_url(visit), 302)]
    ((level, message),) = page_messages(forced)
    assert level == message_levels.WARNING and "reprocess permission" in message
    assert not AuditEntry.objects.exists()
    assert Stage.objects.get(run=visit.current_run, name="note").status == StageStatus.FAILED


def test_operating_needs_staff_a_view_of_the_visit_and_a_csrf_token(
    client, clinician, operator, django_user_model
):
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    form = {"apply": "1", "reason": "x"}
    url = operate_url(visit, "cancel")

    # Not logged in: the admin's login page.
    assert client.post(url, form).status_code == 302
    # Staff who may not even see visits.
    stranger = django_user_model.objects.create_user(
        username="stranger", password="x", is_staff=True
    )
    client.force_login(stranger)
    assert client.post(url, form).status_code == 403
    # An operator, but a post without the CSRF token.
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(operator)
    assert strict.post(url, form).status_code == 403
    assert not AuditEntry.objects.exists()
    visit.current_run.refresh_from_db()
    assert visit.current_run.status == RunStatus.QUEUED
