"""Operating visits: retry without redoing, re-run from a stage, permissions, audit, admin."""

from __future__ import annotations

import getpass
import threading
from io import StringIO

import pytest
from django.contrib.auth.models import Permission
from django.core.exceptions import PermissionDenied
from django.core.management import CommandError, call_command
from django.db import connection
from django.urls import reverse

from pipeline.core.errors import OperationRefused
from pipeline.core.models import Attempt, AuditEntry, LLMCall, Run, RunStatus, Stage, StageStatus
from pipeline.core.store import run_create
from tests.conftest import SHORT_VISIT, is_postgres
from tests.support.audit import AUDITED
from visits.models import Visit
from visits.services import visit_create, visit_rerun_from, visit_retry, visit_start
from visits.stages import VISIT_WORKFLOW

# The heartbeat thread has its own connection: rows must be committed for it to see them.
pytestmark = pytest.mark.django_db(transaction=True)


def attempts_by_stage(run: Run) -> dict[str, int]:
    return {s.name: s.attempts.count() for s in run.stages.order_by("position")}


@pytest.fixture
def operator(django_user_model):
    user = django_user_model.objects.create_user(username="oncall", password="x", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["reprocess_visit", "view_visit"])
    )
    return django_user_model.objects.get(pk=user.pk)  # fresh permission cache


def failed_at_note(clinician, llm_server) -> Visit:
    """A visit whose note stage hit a provider that refused our key."""
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    llm_server.script("ok", "401")
    visit_start(visit=visit, inline=True)
    visit.refresh_from_db()
    assert visit.current_run.status == RunStatus.FAILED
    return visit


def test_reprocess_finishes_a_visit_failed_in_an_llm_stage_without_redoing_anything(
    clinician, llm_server
):
    visit = failed_at_note(clinician, llm_server)
    summarize_requests = [r for r in llm_server.requests if r.answered]
    assert len(summarize_requests) == 1

    out = StringIO()
    call_command("reprocess", "--visit", str(visit.pk), "--inline", *AUDITED, stdout=out)

    visit.refresh_from_db()
    run = visit.current_run
    assert run.status == RunStatus.SUCCEEDED
    assert attempts_by_stage(run) == {"ingest": 1, "transcribe": 1, "summarize": 1, "note": 2}
    assert llm_server.answered_sent_again() == []
    assert [r.fault for r in llm_server.requests] == ["ok", "401", "ok"]
    # The retry reused ingest, transcribe and summarize: saved what they cost.
    retry = Attempt.objects.get(stage__run=run, stage__name="note", number=2)
    summarize_cost = LLMCall.objects.get(stage__run=run, stage__name="summarize")
    assert retry.saved_input_tokens == summarize_cost.input_tokens
    assert retry.saved_audio_seconds == pytest.approx(11.76, abs=0.2)
    spent = LLMCall.objects.get(stage__run=run, stage__name="note")
    assert out.getvalue().splitlines()[-1] == (
        f"succeeded 1, failed 0, enqueued 0, skipped 0; tokens spent "
        f"{spent.input_tokens + spent.output_tokens} (${spent.cost_usd:.4f}), tokens saved by "
        f"reuse {retry.saved_input_tokens + retry.saved_output_tokens} "
        f"(${retry.saved_cost_usd:.4f})"
    )
    (entry,) = AuditEntry.objects.all()
    assert (entry.action, entry.run_id, entry.stage, entry.actor) == ("retry", run.pk, "note", None)
    # The engine's log and the audit trail both name the --actor and the OS login beside it.
    assert entry.actor_label == f"test-operator (cli:{getpass.getuser()})"
    (event,) = visit.access_events.exclude(action="consent")
    assert (event.action, event.run_id, event.actor_label, event.os_user, event.reason) == (
        "retry",
        run.pk,
        "test-operator",
        getpass.getuser(),
        "checked by the test suite",
    )


def test_dry_run_prints_the_plan_and_changes_nothing(clinician, llm_server):
    visit = failed_at_note(clinician, llm_server)
    out = StringIO()
    call_command(
        "reprocess", "--status", "failed", "--stage", "note", "--dry-run", *AUDITED, stdout=out
    )
    note_tokens = sum(
        c.input_tokens + c.output_tokens for c in LLMCall.objects.filter(stage__name="note")
    )
    assert out.getvalue().splitlines() == [
        f"visit {visit.pk}: retry run note; reuse ingest, transcribe, summarize; "
        f"~{note_tokens} tokens",
        f"plan: 1 visit(s), ~{note_tokens} tokens estimated",
    ]
    visit.current_run.refresh_from_db()
    assert visit.current_run.status == RunStatus.FAILED
    assert not AuditEntry.objects.exists()


def test_rerun_from_a_stage_forks_a_new_run_and_keeps_the_old_one(clinician, operator, llm_server):
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit, inline=True)
    visit.refresh_from_db()
    old = visit.current_run
    old_note = old.stages.get(name="note").output

    visit_rerun_from(
        visit=visit, stage="summarize", actor=operator, reason="new prompt", inline=True
    )

    visit.refresh_from_db()
    new = visit.current_run
    assert new.pk != old.pk and new.forked_from_id == old.pk and new.fork_stage == "summarize"
    assert new.status == RunStatus.SUCCEEDED
    assert attempts_by_stage(new) == {"ingest": 0, "transcribe": 0, "summarize": 1, "note": 1}
    for name in ("ingest", "transcribe"):
        assert new.stages.get(name=name).reused_from == old.stages.get(name=name)
    assert attempts_by_stage(old) == {"ingest": 1, "transcribe": 1, "summarize": 1, "note": 1}
    old.refresh_from_db()
    assert old.status == RunStatus.SUCCEEDED and old.stages.get(name="note").output == old_note
    # The chosen stage and all after it ran anew: their requests went to the model again.
    assert len([r for r in llm_server.requests if r.answered]) == 4
    fork_point = Attempt.objects.get(stage__run=new, stage__name="summarize")
    assert fork_point.saved_audio_seconds == pytest.approx(11.76, abs=0.2)
    entry = AuditEntry.objects.get()
    assert (entry.action, entry.actor, entry.new_run, entry.reason) == (
        "rerun",
        operator,
        new,
        "new prompt",
    )


def test_two_operators_re_running_the_same_visit_make_one_fork(finished_visit, operator):
    # Both opened the visit before either re-ran it: each holds the run they saw.
    first, second = (Visit.objects.get(pk=finished_visit.pk) for _ in range(2))
    seen = first.current_run_id

    visit_rerun_from(visit=first, stage="note", actor=operator, reason="new prompt")
    with pytest.raises(OperationRefused, match="re-run meanwhile"):
        visit_rerun_from(visit=second, stage="note", actor=operator, reason="new prompt too")

    assert Run.objects.filter(forked_from_id=seen).count() == 1


@pytest.mark.skipif(not is_postgres(), reason="row locks are PostgreSQL's; SQLite serializes")
def test_concurrent_re_runs_of_one_visit_make_one_fork(finished_visit, operator):
    seen = finished_visit.current_run_id
    start = threading.Barrier(2)
    refused: list[Exception] = []

    def rerun() -> None:
        visit = Visit.objects.get(pk=finished_visit.pk)
        start.wait()
        try:
            visit_rerun_from(visit=visit, stage="note", actor=operator, reason="at once")
        except OperationRefused as exc:
            refused.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=rerun) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert Run.objects.filter(forked_from_id=seen).count() == 1
    assert len(refused) == 1


def test_rerun_is_refused_while_a_run_is_active_and_from_an_unknown_stage(clinician, operator):
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    with pytest.raises(OperationRefused, match="still queued"):
        visit_rerun_from(visit=visit, stage="note", actor=operator, reason="x")
    with pytest.raises(OperationRefused, match="not a stage"):
        visit_rerun_from(visit=visit, stage="billing", actor=operator, reason="x")
    with pytest.raises(OperationRefused, match="reason is required"):
        visit_retry(visit=visit, actor=operator, reason="  ")
    assert not AuditEntry.objects.exists()


def test_only_staff_with_the_permission_may_operate(clinician, django_user_model):
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    staff = django_user_model.objects.create_user(username="staff", password="x", is_staff=True)
    for actor in (clinician, staff):
        with pytest.raises(PermissionDenied):
            visit_retry(visit=visit, actor=actor, reason="please")
    assert not AuditEntry.objects.exists()


def test_admin_action_asks_for_a_reason_then_acts_and_audits(
    client, clinician, operator, llm_server
):
    visit = failed_at_note(clinician, llm_server)
    client.force_login(operator)
    url = reverse("admin:visits_visit_changelist")
    form = {"action": "retry_failed_stage", "_selected_action": [visit.pk]}

    page = client.post(url, form)
    assert page.status_code == 200 and b"Kept in the audit trail" in page.content
    done = client.post(url, {**form, "apply": "1", "reason": "provider outage over"})
    assert done.status_code == 302

    entry = AuditEntry.objects.get()
    assert (entry.action, entry.actor, entry.reason) == ("retry", operator, "provider outage over")
    stage = Stage.objects.get(run=visit.current_run, name="note")
    assert stage.status == StageStatus.READY  # enqueued for the cluster, not run here


def test_admin_hides_operations_from_staff_without_the_permission(
    client, clinician, django_user_model
):
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    viewer = django_user_model.objects.create_user(username="viewer", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_visit"))
    client.force_login(viewer)
    url = reverse("admin:visits_visit_changelist")
    page = client.get(url)
    assert page.status_code == 200 and b"retry_failed_stage" not in page.content
    client.post(
        url,
        {
            "action": "retry_failed_stage",
            "_selected_action": [visit.pk],
            "apply": "1",
            "reason": "x",
        },
    )
    assert not AuditEntry.objects.exists()


def test_audit_trail_is_read_only_in_the_admin(admin_client, clinician, operator, llm_server):
    visit = failed_at_note(clinician, llm_server)
    visit_retry(visit=visit, actor=operator, reason="outage")
    entry = AuditEntry.objects.get()
    assert admin_client.get(reverse("admin:pipeline_auditentry_changelist")).status_code == 200
    assert admin_client.get(reverse("admin:pipeline_auditentry_add")).status_code == 403
    assert (
        admin_client.post(reverse("admin:pipeline_auditentry_delete", args=[entry.pk])).status_code
        == 403
    )
    page = admin_client.post(
        reverse("admin:pipeline_auditentry_change", args=[entry.pk]), {"reason": "edited"}
    )
    entry.refresh_from_db()
    assert entry.reason == "outage" and page.status_code in (200, 403)


def test_reprocess_needs_a_selection_and_a_real_date():
    with pytest.raises(CommandError, match="Choose the visits"):
        call_command("reprocess", *AUDITED, stdout=StringIO())
    with pytest.raises(CommandError, match="not a date"):
        call_command("reprocess", "--since", "2026-13-45", *AUDITED, stdout=StringIO())


@pytest.mark.django_db(transaction=False)
def test_admin_lists_render_1000_visits_in_a_bounded_number_of_queries(
    admin_client, clinician, django_assert_max_num_queries
):
    runs = []
    for index in range(1000):
        runs.append(run_create(workflow=VISIT_WORKFLOW, subject=f"visit:{index}", input={}))
    Stage.objects.filter(run__in=runs[::3], name="ingest").update(
        status=StageStatus.FAILED, error_code="unreadable_recording", failure_kind="permanent"
    )
    Visit.objects.bulk_create(
        Visit(
            clinician=clinician,
            recording=f"recordings/{i}.mp3",
            recording_name="x.mp3",
            recording_bytes=1,
            current_run=run,
        )
        for i, run in enumerate(runs)
    )
    for name in (
        "visits_visit",
        "pipeline_run",
        "pipeline_stage",
        "pipeline_attempt",
        "pipeline_auditentry",
    ):
        with django_assert_max_num_queries(20):
            response = admin_client.get(reverse(f"admin:{name}_changelist"))
        assert response.status_code == 200, name
    with django_assert_max_num_queries(20):
        response = admin_client.get(reverse("admin:visits_visit_changelist") + "?state=failed")
    assert b"unreadable_recording" in response.content


def test_a_stage_page_lists_every_attempt_with_worker_duration_error_and_traceback(
    admin_client, clinician, llm_server
):
    visit = failed_at_note(clinician, llm_server)
    note = Stage.objects.get(run=visit.current_run, name="note")
    page = admin_client.get(reverse("admin:pipeline_stage_change", args=[note.pk]))
    text = page.content.decode()
    attempt = note.attempts.get()
    assert page.status_code == 200
    assert attempt.worker in text
    assert "llm_http_401" in text
    assert "Traceback (most recent call last)" in text
    assert f"{(attempt.finished_at - attempt.started_at).total_seconds():.2f} s" in text
