"""Retention (issue 11 §6): a visit's PHI is purged RETENTION_DAYS after its note was signed, or
RETENTION_UNSIGNED_DAYS after upload when it never was; the files of every run and re-run go
(never one another visit still needs), checkpoints and model answers go, the summary and draft
become empty placeholders; the visit, its signed note (seal intact), the ledger's figures and
the audit trail stay; and a purged visit's page, status and exports still answer."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.db.models import Sum
from django.urls import reverse
from django.utils import timezone
from django_q.models import Schedule

from pipeline import artifact_path
from pipeline.core import store
from pipeline.core.errors import OperationRefused
from pipeline.core.models import Checkpoint, LLMCall, Stage
from pipeline.core.selectors import output_of
from pipeline.core.workflow import workflow_get
from tests.conftest import SHORT_VISIT
from visits.models import AccessEvent, NoteVersion, Visit
from visits.notes.delivery import NOTE_DELIVERY_WORKFLOW
from visits.notes.versions import note_sign
from visits.privacy.retention import (
    OUTPUTS_WITHOUT_PHI,
    PURGED_ENGINE,
    PURGED_OUTPUTS,
    VisitAlreadyPurged,
    purge_task,
    visit_purge,
    visits_due_for_purge,
)
from visits.refs import INGEST, NOTE, SUMMARIZE, TRANSCRIBE
from visits.schedules import PURGE_SCHEDULE_NAME, schedules_ensure
from visits.selectors import visit_stages, visit_transcript
from visits.services import visit_create, visit_rerun_from, visit_start
from visits.stages import VISIT_WORKFLOW

# The pipeline runs inline, whose heartbeat needs committed rows.
pytestmark = pytest.mark.django_db(transaction=True)

ACTOR = ["--actor", "privacy-officer", "--reason", "monthly retention run"]


@pytest.fixture(autouse=True)
def no_ehr(settings) -> None:
    settings.FHIR_BASE_URL = ""


def processed(clinician) -> Visit:
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit, inline=True)
    visit.refresh_from_db()
    return visit


def signed(visit: Visit, *, days_ago: int) -> Visit:
    note_sign(visit=visit, clinician=visit.clinician, number=1)
    NoteVersion.objects.filter(visit=visit).update(
        signed_at=timezone.now() - timedelta(days=days_ago)
    )
    return visit


def uploaded(visit: Visit, *, days_ago: int) -> Visit:
    Visit.objects.filter(pk=visit.pk).update(created_at=timezone.now() - timedelta(days=days_ago))
    return visit


def purge(*extra: str) -> str:
    out = StringIO()
    call_command("purge", *ACTOR, *extra, stdout=out)
    return out.getvalue()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def artifact_files(visit: Visit) -> list[Path]:
    """The decoded audio and the transcript of the visit's current run, where they are."""
    stages = visit_stages(visit)
    ingested = output_of(stages, INGEST)
    transcribed = output_of(stages, TRANSCRIBE)
    assert ingested and transcribed
    return [artifact_path(ingested.audio), artifact_path(transcribed.transcript)]


def ledger(visit: Visit) -> dict[str, object]:
    return LLMCall.objects.filter(stage__run__subject=visit.subject).aggregate(
        Sum("input_tokens"), Sum("output_tokens"), Sum("cost_usd")
    )


# --- who is due ------------------------------------------------------------------------------


def test_a_signed_visit_past_retention_is_purged_and_keeps_what_the_chart_needs(
    clinician, llm_server, private_storage
):
    visit = signed(processed(clinician), days_ago=31)
    recording = artifact_path(visit.recording.name)
    audio, transcript = artifact_files(visit)
    assert recording.is_file() and audio.is_file() and transcript.is_file()
    assert Checkpoint.objects.filter(stage__run=visit.current_run).exists()
    calls = LLMCall.objects.filter(stage__run=visit.current_run)
    assert calls.count() == 2 and all(call.content for call in calls)
    figures = ledger(visit)
    assert figures["cost_usd__sum"] > Decimal(0)
    note_before = NoteVersion.objects.get(visit=visit)

    out = purge()

    assert out.splitlines()[0].startswith(f"visit {visit.pk}: purged 1 run(s); 3 file(s)")
    assert "1 visit(s) purged" in out
    assert not recording.exists() and not audio.exists() and not transcript.exists()
    assert files_under(private_storage) == []
    assert not Checkpoint.objects.filter(stage__run=visit.current_run).exists()
    assert [call.content for call in calls.all()] == ["", ""]
    assert ledger(visit) == figures
    stages = {stage.name: stage for stage in visit_stages(visit)}
    for ref in (SUMMARIZE, NOTE):
        emptied = output_of(list(stages.values()), ref)
        assert emptied is not None and emptied.engine == PURGED_ENGINE
    assert output_of(list(stages.values()), SUMMARIZE).summary.history == []
    assert stages["ingest"].output["duration_seconds"] > 0  # figures, no PHI: kept
    note = NoteVersion.objects.get(visit=visit)
    assert note.content == note_before.content and note.is_signed and note.is_intact
    visit.refresh_from_db()
    assert visit.purged_at is not None and visit.recording.name == ""
    assert visit.recording_name == "(purged).mp3"  # the upload's own name may name the patient
    with pytest.raises(OperationRefused, match=r"purged on .* nothing can be retried or re-run"):
        visit_rerun_from(visit=visit, stage="summarize", actor=None, reason="one more look")
    event = AccessEvent.objects.get(visit=visit, action=AccessEvent.Action.PURGE)
    assert event.actor_label == "privacy-officer" and event.reason == "monthly retention run"
    assert event.detail.startswith("1 run(s); 3 file(s) or folder(s), ")
    # Done is done: the next purge finds nothing, and a direct one is refused.
    assert "0 visit(s) purged" in purge()
    with pytest.raises(VisitAlreadyPurged):
        visit_purge(visit, reason="again")


def test_visits_inside_their_retention_are_kept(clinician, settings):
    settings.RETENTION_DAYS, settings.RETENTION_UNSIGNED_DAYS = 30, 90
    recent = signed(processed(clinician), days_ago=29)
    unsigned = uploaded(processed(clinician), days_ago=89)
    # Uploaded long ago but signed (amended) lately: the clock runs from the signature.
    lately = signed(uploaded(processed(clinician), days_ago=400), days_ago=3)

    out = purge()

    assert "0 visit(s) purged" in out
    for visit in (recent, unsigned, lately):
        visit.refresh_from_db()
        assert visit.purged_at is None
        assert artifact_path(visit.recording.name).is_file()
    assert not AccessEvent.objects.filter(action=AccessEvent.Action.PURGE).exists()


def test_an_unsigned_visit_is_purged_after_the_longer_period(clinician, settings):
    settings.RETENTION_UNSIGNED_DAYS = 90
    old = uploaded(processed(clinician), days_ago=91)
    young = uploaded(processed(clinician), days_ago=31)  # past RETENTION_DAYS, but unsigned

    assert list(visits_due_for_purge(timezone.now())) == [old]
    out = purge()

    assert f"visit {old.pk}: purged" in out and f"visit {young.pk}" not in out
    old.refresh_from_db()
    assert old.purged_at is not None
    assert NoteVersion.objects.get(visit=old).content["soap"]  # the unsigned draft stays


def test_dry_run_lists_what_would_go_and_changes_nothing(clinician, private_storage):
    visit = signed(processed(clinician), days_ago=31)
    before = files_under(private_storage)
    checkpoints = Checkpoint.objects.count()
    run = visit.current_run_id

    out = purge("--dry-run")

    lines = out.splitlines()
    assert lines[0].startswith(f"visit {visit.pk}: would purge 1 run(s); 3 file(s)")
    assert f"  {visit.recording.name}" in lines
    assert f"  runs/{run}/ingest" in lines and f"  runs/{run}/transcribe" in lines
    assert "1 visit(s) would be purged" in out
    assert files_under(private_storage) == before
    assert Checkpoint.objects.count() == checkpoints
    visit.refresh_from_db()
    assert visit.purged_at is None
    assert not AccessEvent.objects.filter(action=AccessEvent.Action.PURGE).exists()


# --- re-runs and files shared between runs --------------------------------------------------


def test_a_rerun_visit_has_every_run_purged_and_no_file_left(
    clinician, llm_server, private_storage
):
    visit = processed(clinician)
    first = visit.current_run
    visit_rerun_from(visit=visit, stage="summarize", actor=None, reason="new model", inline=True)
    visit.refresh_from_db()
    fork = visit.current_run
    assert fork.forked_from_id == first.pk and fork.status == "succeeded"
    # The fork reads the first run's audio and transcript: they are its files too.
    assert artifact_files(visit)[1].is_relative_to(private_storage / f"runs/{first.pk}")
    uploaded(visit, days_ago=91)

    out = purge()

    assert out.startswith(f"visit {visit.pk}: purged 2 run(s)")
    assert files_under(private_storage) == []
    assert not (private_storage / "runs" / str(first.pk)).exists()
    assert not Checkpoint.objects.filter(stage__run__in=[first, fork]).exists()
    assert not LLMCall.objects.filter(stage__run__in=[first, fork]).exclude(content="").exists()
    for stage in Stage.objects.filter(run__in=[first, fork], name__in=PURGED_OUTPUTS):
        assert stage.output["engine"] == PURGED_ENGINE


def forked_across_visits(clinician) -> tuple[Visit, Visit]:
    """Visits A and B, B's run forked from A's: B re-uses A's recording and transcription."""
    a = processed(clinician)
    b = visit_create(clinician=clinician, recording=SHORT_VISIT)
    b.current_run = store.run_create(
        workflow=VISIT_WORKFLOW,
        subject=b.subject,
        input=a.current_run.input,
        forked_from=a.current_run,
        fork_stage="summarize",
    )
    b.save(update_fields=["current_run"])
    visit_start(visit=b, inline=True)
    b.refresh_from_db()
    assert b.current_run.status == "succeeded"
    return a, b


def test_purging_a_visit_never_deletes_a_file_another_visit_still_needs(clinician, private_storage):
    a, b = forked_across_visits(clinician)
    a_files = [artifact_path(a.recording.name), *artifact_files(a)]
    uploaded(a, days_ago=91)

    out = purge()

    assert f"visit {a.pk}: purged" in out and "3 kept for other visits" in out
    assert all(path.is_file() for path in a_files)
    assert visit_transcript(visit_stages(b)) is not None
    assert artifact_path(b.recording.name).is_file()

    # Once B goes as well, nothing is left of either, A's files included.
    uploaded(b, days_ago=91)
    out = purge()

    assert f"visit {b.pk}: purged" in out
    assert files_under(private_storage) == []


def test_purging_the_fork_first_leaves_the_files_of_the_visit_it_came_from(
    clinician, private_storage
):
    a, b = forked_across_visits(clinician)
    a_files = [artifact_path(a.recording.name), *artifact_files(a)]
    b_recording = artifact_path(b.recording.name)
    uploaded(b, days_ago=91)

    out = purge()

    assert f"visit {b.pk}: purged" in out and "3 kept for other visits" in out
    assert all(path.is_file() for path in a_files) and not b_recording.exists()
    assert visit_transcript(visit_stages(a)) is not None


# --- a purged visit still answers -----------------------------------------------------------


def test_the_visit_page_status_and_exports_of_a_purged_visit_answer(client, clinician):
    visit = signed(processed(clinician), days_ago=31)
    purge()
    visit.refresh_from_db()
    day = f"{visit.purged_at:%Y-%m-%d}"
    client.force_login(clinician)

    page = client.get(reverse("visits:detail", args=[visit.pk]))
    assert page.status_code == 200
    text = page.content.decode()
    assert f"Purged on {day} under the retention policy" in text
    assert 'id="recording-player"' not in text and "Transcript</h2>" not in text
    assert client.get(reverse("visits:live", args=[visit.pk])).status_code == 200
    history = client.get(reverse("visits:history", args=[visit.pk]))
    assert history.status_code == 200 and "purged the visit" in history.content.decode()
    recording = client.get(reverse("visits:recording", args=[visit.pk]))
    assert recording.status_code == 410 and day in recording.content.decode()
    assert client.get(reverse("visits:fhir", args=[visit.pk])).status_code == 200
    assert client.get(reverse("visits:after_visit_summary", args=[visit.pk])).status_code == 200

    out = StringIO()
    call_command("visit_status", visit.pk, *ACTOR, stdout=out)
    assert f"purged on {day} under the retention policy" in out.getvalue()
    out = StringIO()
    call_command("visit_status", visit.pk, "--json", *ACTOR, stdout=out)
    document = json.loads(out.getvalue())
    assert document["purged_at"].startswith(day)
    assert document["transcript"] is None and document["summary"] is None
    assert document["note_version"] == 1 and document["note_status"] == "signed"


def test_the_command_needs_an_actor_and_a_reason(clinician):
    visit = uploaded(processed(clinician), days_ago=91)
    with pytest.raises(CommandError, match="--actor, --reason"):
        call_command("purge", stdout=StringIO())
    with pytest.raises(CommandError, match="must not be empty"):
        call_command("purge", "--actor", "x", "--reason", " ", stdout=StringIO())
    visit.refresh_from_db()
    assert visit.purged_at is None


# --- the admin and the schedule -------------------------------------------------------------


def test_the_admin_purges_with_a_reason_and_never_deletes(
    admin_client, admin_user, client, clinician, django_user_model
):
    visit = processed(clinician)  # not due: the admin purges now, on request
    changelist = admin_client.get(reverse("admin:visits_visit_changelist"))
    offered = [value for value, _ in changelist.context["action_form"].fields["action"].choices]
    assert "purge_now" in offered and "delete_selected" not in offered
    delete_url = reverse("admin:visits_visit_delete", args=[visit.pk])
    assert admin_client.post(delete_url, {"post": "yes"}).status_code == 403

    # Staff who may operate the pipeline but not delete visits are refused.
    operator = django_user_model.objects.create_user(username="oncall", is_staff=True)
    operator.user_permissions.add(
        *Permission.objects.filter(codename__in=["reprocess_visit", "view_visit"])
    )
    client.force_login(operator)
    url = reverse("admin:visits_visit_operate", args=[visit.pk, "purge_now"])
    refused = client.post(url, {"apply": "1", "reason": "patient asked"}, follow=True)
    assert "purging needs the permission to delete visits" in refused.content.decode()

    asked = admin_client.get(url)
    assert asked.status_code == 200 and "Purge now (retention)" in asked.content.decode()
    done = admin_client.post(url, {"apply": "1", "reason": "patient asked"}, follow=True)

    assert done.status_code == 200
    visit.refresh_from_db()
    assert visit.purged_at is not None
    assert Visit.objects.filter(pk=visit.pk).exists()
    event = AccessEvent.objects.get(visit=visit, action=AccessEvent.Action.PURGE)
    assert event.actor == admin_user and event.reason == "patient asked"


def test_the_daily_schedule_runs_the_purge(clinician):
    schedules_ensure()
    schedule = Schedule.objects.get(name=PURGE_SCHEDULE_NAME)
    assert schedule.func == "visits.privacy.retention.purge_task"
    assert schedule.schedule_type == Schedule.DAILY and schedule.repeats == -1
    visit = uploaded(processed(clinician), days_ago=91)

    assert purge_task() == 1

    event = AccessEvent.objects.get(visit=visit, action=AccessEvent.Action.PURGE)
    assert event.reason == "retention policy (scheduled purge)"


def test_every_stage_output_is_either_kept_or_given_a_placeholder_of_its_model():
    for workflow in (VISIT_WORKFLOW, NOTE_DELIVERY_WORKFLOW):
        for name in workflow.stage_names:
            assert (name in OUTPUTS_WITHOUT_PHI) != (name in PURGED_OUTPUTS), name
            if name in PURGED_OUTPUTS:
                spec = workflow_get(workflow.name).stage(name)
                spec.output_dump(PURGED_OUTPUTS[name])  # valid as that stage's output
