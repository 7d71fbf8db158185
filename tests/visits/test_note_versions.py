"""The note's versions: the model's draft becomes version 1, the clinician's saves make the next
ones (refused when the note moved on meanwhile), signing seals one, a change after signing is
an amendment with a reason; the difference between versions, the visit's history, the status
document, and the migration that turned per-run signatures into versions."""

from __future__ import annotations

import html
import json
import re
from datetime import timedelta
from io import StringIO

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.db import IntegrityError, connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.urls import reverse
from django.utils import timezone

from pipeline.core.selectors import output_of
from tests.conftest import SHORT_VISIT
from tests.fakes.llm_server import default_content
from tests.support.audit import AUDITED
from visits.models import AccessEvent, NoteVersion, Visit
from visits.notes.fhir import IDENTIFIER_SYSTEM
from visits.notes.versions import LineDiff, note_diff, note_draft_record
from visits.refs import NOTE
from visits.schemas import ChartNote, ChartSOAP, NoteItem, PostVisitNote
from visits.selectors import note_history, visit_stages
from visits.services import visit_create, visit_rerun_from, visit_start

# The pipeline runs inline, whose heartbeat needs committed rows.
pytestmark = pytest.mark.django_db(transaction=True)

REASON = "added that it is taken with food"


@pytest.fixture(autouse=True)
def no_ehr(settings) -> None:
    """No delivery to an EHR unless a test asks for one."""
    settings.FHIR_BASE_URL = ""


@pytest.fixture
def operator(django_user_model):
    """Staff on call: may see every visit and operate its pipeline, but owns none."""
    user = django_user_model.objects.create_user(username="oncall", password="x", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["reprocess_visit", "view_visit"])
    )
    return django_user_model.objects.get(pk=user.pk)  # a fresh row: no cached permissions


@pytest.fixture
def visit(finished_visit) -> Visit:
    return finished_visit


def versions(visit: Visit) -> list[NoteVersion]:
    return list(NoteVersion.objects.filter(visit=visit).order_by("number"))


def version(visit: Visit, number: int) -> NoteVersion:
    return NoteVersion.objects.get(visit=visit, number=number)


def text_of(response) -> str:
    return html.unescape(response.content.decode())


def edit(client, visit: Visit, fields: dict[str, str], *, follow: bool = False):
    return client.post(reverse("visits:note_edit", args=[visit.pk]), fields, follow=follow)


def sign(client, visit: Visit, number: int, reason: str = ""):
    data = {"version": str(number)}
    if reason:
        data["reason"] = reason
    return client.post(reverse("visits:sign", args=[visit.pk]), data, follow=True)


def page(client, visit: Visit, **query: str) -> str:
    response = client.get(reverse("visits:detail", args=[visit.pk]), query)
    assert response.status_code == 200
    return text_of(response)


def fhir(client, visit: Visit, number: int | None = None):
    query = {"version": str(number)} if number is not None else {}
    return client.get(reverse("visits:fhir", args=[visit.pk]), query)


def resources(response) -> tuple[dict, dict]:
    """The Composition and the DocumentReference of an exported Bundle."""
    document = json.loads(response.content)
    composition, reference = (entry["resource"] for entry in document["entry"][:2])
    assert (composition["resourceType"], reference["resourceType"]) == (
        "Composition",
        "DocumentReference",
    )
    return composition, reference


def statuses(visit: Visit) -> list[str]:
    return [entry.status for entry in note_history(visit)]


def ibuprofen_line(visit: Visit) -> tuple[int, NoteItem]:
    """The subjective line of version 1 that states the dose, and its place."""
    found = [
        (i, item)
        for i, item in enumerate(version(visit, 1).note.soap.subjective)
        if "400" in item.text.split()
    ]
    assert found, "the short visit's draft states the ibuprofen dose"
    return found[0]


def with_food(line: NoteItem) -> str:
    """The line reworded without stating anything its cited segment does not say."""
    return line.text.rstrip(".") + " with food."


def amend(client, visit: Visit) -> NoteVersion:
    """Sign version 1, then save a reworded line as an amendment (version 2), signed too."""
    sign(client, visit, 1)
    assert version(visit, 1).is_signed
    i, line = ibuprofen_line(visit)
    response = edit(
        client,
        visit,
        {"base": "1", f"subjective-{i}": with_food(line), "reason": REASON},
    )
    assert response.status_code == 302
    sign(client, visit, 2)
    amendment = version(visit, 2)
    assert amendment.kind == NoteVersion.Kind.AMENDMENT and amendment.is_signed
    return amendment


# --- 1. the model's draft ------------------------------------------------------------------


def test_the_models_draft_becomes_version_1_once(visit):
    (first,) = versions(visit)
    drafted = output_of(visit_stages(visit), NOTE)
    assert drafted is not None

    assert (first.number, first.kind, first.author, first.run_id) == (
        1,
        NoteVersion.Kind.DRAFT,
        None,
        visit.current_run_id,
    )
    assert first.engine == drafted.engine and "offline" in first.engine
    assert not first.is_signed and first.content_sha256 == "" and first.reason == ""
    note = first.note
    assert note == ChartNote.from_draft(drafted.note)
    lines = [item for _, _, items in note.parts() for item in items]
    assert lines, "the short visit's draft has lines"
    assert all(item.source == "model" and item.segment_ids for item in lines)
    assert not any(item.edited for item in lines)
    # One draft per run: a second commit of the same run's note is refused by the database.
    with pytest.raises(IntegrityError), transaction.atomic():
        note_draft_record(first.run, drafted)
    assert NoteVersion.objects.count() == 1


def test_a_retried_note_stage_still_makes_one_version(clinician, llm_server):
    llm_server.script("ok", "500")  # summarize answered; the note's first request fails

    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit, inline=True)

    (note_stage,) = [s for s in visit_stages(visit) if s.name == "note"]
    assert [a.status for a in note_stage.attempts.all()] == ["failed", "succeeded"]
    (first,) = versions(visit)
    assert first.kind == NoteVersion.Kind.DRAFT and first.engine == "gpt-4o-mini"


def test_a_rerun_from_note_adds_a_draft_and_leaves_the_signed_version_alone(
    client, clinician, operator, visit
):
    client.force_login(clinician)
    sign(client, visit, 1)
    signed = version(visit, 1)
    assert signed.is_signed
    kept = (signed.content, signed.signed_at, signed.content_sha256, signed.signed_by_id)

    visit_rerun_from(visit=visit, stage="note", actor=operator, reason="try again", inline=True)
    visit.refresh_from_db()

    first, second = versions(visit)
    assert first.run_id != visit.current_run_id
    assert (second.number, second.kind, second.author, second.run_id) == (
        2,
        NoteVersion.Kind.DRAFT,
        None,
        visit.current_run_id,
    )
    assert not second.is_signed
    assert (first.content, first.signed_at, first.content_sha256, first.signed_by_id) == kept
    assert first.is_intact
    assert statuses(visit) == ["signed", "draft"]


# --- 2. editing ------------------------------------------------------------------------------


def test_an_edit_keeps_the_evidence_of_a_reworded_line_and_marks_added_ones(
    client, clinician, visit
):
    client.force_login(clinician)
    before = version(visit, 1)
    original = before.note
    i, line = ibuprofen_line(visit)
    removed = next(k for k in range(len(original.soap.subjective)) if k != i)
    assert "clinician-entered" not in page(client, visit)
    reworded = with_food(line)
    started = timezone.now()

    response = edit(
        client,
        visit,
        {
            "base": "1",
            f"subjective-{i}": reworded,
            f"subjective-{removed}-remove": "on",
            "plan-new": "Recheck blood pressure in clinic.\nBring the medication list.",
        },
    )

    assert response.status_code == 302
    assert response["Location"] == reverse("visits:detail", args=[visit.pk])
    first, second = versions(visit)
    assert (second.number, second.kind, second.author, second.based_on_id, second.run_id) == (
        2,
        NoteVersion.Kind.EDIT,
        clinician,
        first.pk,
        first.run_id,
    )
    assert started <= second.created_at <= timezone.now()
    note = second.note
    expected_subjective = [
        item.model_copy(update={"text": reworded, "edited": True}) if k == i else item
        for k, item in enumerate(original.soap.subjective)
        if k != removed
    ]
    assert note.soap.subjective == expected_subjective
    changed = next(item for item in note.soap.subjective if item.text == reworded)
    assert changed.segment_ids == line.segment_ids and changed.source == "model"
    assert changed.edited
    assert note.soap.plan == [
        *original.soap.plan,
        NoteItem(text="Recheck blood pressure in clinic.", source="clinician"),
        NoteItem(text="Bring the medication list.", source="clinician"),
    ]
    assert all(not item.segment_ids for item in note.soap.plan[-2:])
    assert note.patient_summary == original.patient_summary
    # Version 1 is as the model wrote it.
    assert first.content == before.content and first.note == original

    text = page(client, visit)
    assert re.search(
        r"<li>Recheck blood pressure in clinic\.\s*<span class=\"tag\"[^>]*>clinician-entered<",
        text,
    )
    shown = re.search(rf"<li>{re.escape(reworded)}(.*?)</li>", text, re.S)
    assert shown is not None
    assert ">edited</span>" in shown.group(1) and "clinician-entered" not in shown.group(1)
    for segment in line.segment_ids:
        assert f'data-cite="{segment}"' in shown.group(1)  # still cites its evidence


def test_saving_with_nothing_changed_is_refused(client, clinician, visit):
    client.force_login(clinician)
    note = version(visit, 1).note
    unchanged = {
        f"{key}-{i}": item.text for key, _, items in note.parts() for i, item in enumerate(items)
    }

    for fields in ({"base": "1"}, {"base": "1", **unchanged}):
        response = edit(client, visit, fields)

        assert response.status_code == 400
        assert "Nothing changed, so no new version was saved." in text_of(response)
        assert [v.number for v in versions(visit)] == [1]


def test_an_untouched_model_line_with_irregular_spacing_is_not_an_edit(
    client, clinician, llm_server
):
    llm_server.responder = lambda body: default_content(body).replace(
        '"stub"', '"Take ibuprofen  400 mg\\nthree times a day."'
    )
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit, inline=True)
    note = version(visit, 1).note
    assert "  " in note.soap.subjective[0].text  # the model's spacing, kept as it came
    client.force_login(clinician)
    # The edit form sends every line back as it showed it.
    unchanged = {
        f"{key}-{i}": item.text for key, _, items in note.parts() for i, item in enumerate(items)
    }

    response = edit(client, visit, {"base": "1", **unchanged})

    assert response.status_code == 400
    assert [v.number for v in versions(visit)] == [1]


def test_only_the_visits_clinician_edits(client, operator, visit):
    client.force_login(operator)  # sees the visit, but it is not theirs
    i, _ = ibuprofen_line(visit)

    response = edit(
        client, visit, {"base": "1", f"subjective-{i}": "changed by staff"}, follow=True
    )

    assert "Only the visit's clinician can edit its note." in text_of(response)
    assert [v.number for v in versions(visit)] == [1]


# --- 3. optimistic concurrency ---------------------------------------------------------------


def test_a_second_save_from_the_same_version_is_refused_and_keeps_the_users_text(
    client, clinician, visit
):
    client.force_login(clinician)
    i, line = ibuprofen_line(visit)
    # Two tabs opened version 1; the first saves.
    first_tab = edit(client, visit, {"base": "1", f"subjective-{i}": line.text + " With food."})
    assert first_tab.status_code == 302
    assert version(visit, 2).author == clinician

    second_tab = edit(
        client,
        visit,
        {"base": "1", "plan-new": "Start physiotherapy twice weekly."},
    )

    assert second_tab.status_code == 409
    assert [v.number for v in versions(visit)] == [1, 2]
    text = text_of(second_tab)
    assert re.search(
        r"The note changed since you opened version 1: version 2 was saved by dr_ada at "
        r"\d\d:\d\d:\d\d\. Your changes were not saved",
        text,
    )
    yours = text.split("Your changes to version 1 (not saved)", 1)[1]
    yours, rest = yours.split("What changed meanwhile (version 1 → 2)", 1)
    assert "<ins>Start physiotherapy twice weekly.</ins>" in yours
    assert "With food." in rest.split("</div>", 1)[0]  # theirs: the first tab's change
    form = rest.split('<form method="post" class="card note-edit">', 1)[1]
    assert '<input type="hidden" name="base" value="2">' in form  # the form holds version 2
    assert "Start physiotherapy" not in form


def test_a_save_after_a_rerun_says_the_pipeline_moved_the_note_on(
    client, clinician, operator, visit
):
    client.force_login(clinician)
    visit_rerun_from(visit=visit, stage="note", actor=operator, reason="try again", inline=True)
    i, _ = ibuprofen_line(visit)

    response = edit(client, visit, {"base": "1", f"subjective-{i}": "Takes nothing."})

    assert response.status_code == 409
    assert "version 2 was saved by a re-run of the pipeline" in text_of(response)
    assert [v.kind for v in versions(visit)] == ["draft", "draft"]


# --- 4. signing ------------------------------------------------------------------------------


def test_only_the_visits_clinician_signs_the_latest_version_once(
    client, clinician, other_clinician, operator, visit
):
    url = reverse("visits:sign", args=[visit.pk])
    client.force_login(other_clinician)
    assert client.post(url, {"version": "1"}).status_code == 404  # not even visible

    client.force_login(operator)  # may see the visit, but it is not theirs
    refused = sign(client, visit, 1)
    assert "Only the visit's clinician can sign its note." in text_of(refused)
    assert not version(visit, 1).is_signed

    client.force_login(clinician)
    started = timezone.now()
    done = sign(client, visit, 1)

    assert "Version 1 signed." in text_of(done)
    signed = version(visit, 1)
    assert signed.signed_by == clinician
    assert started <= signed.signed_at <= timezone.now()
    assert signed.content_sha256 == signed.seal() and len(signed.content_sha256) == 64
    assert signed.is_intact
    again = sign(client, visit, 1)
    assert "Version 1 of the note is already signed." in text_of(again)
    assert version(visit, 1).signed_at == signed.signed_at
    assert client.get(url).status_code == 405


def test_only_the_latest_version_can_be_signed(client, clinician, visit):
    client.force_login(clinician)
    i, line = ibuprofen_line(visit)
    edit(client, visit, {"base": "1", f"subjective-{i}": line.text + " With food."})

    refused = sign(client, visit, 1)

    text = text_of(refused)
    assert "The note changed since you opened version 1: version 2 was saved by dr_ada" in text
    assert "Nothing was signed: read that version first." in text
    assert not any(v.is_signed for v in versions(visit))


def test_a_signed_version_changed_in_the_database_is_detected_and_not_exported(
    client, clinician, visit
):
    client.force_login(clinician)
    sign(client, visit, 1)
    signed = version(visit, 1)
    note = signed.note
    tampered = note.model_copy(
        update={"soap": note.soap.model_copy(update={"plan": [NoteItem(text="No follow-up.")]})}
    )
    assert "changed after it was signed" not in page(client, visit)

    NoteVersion.objects.filter(pk=signed.pk).update(content=tampered.model_dump(mode="json"))

    signed.refresh_from_db()
    assert not signed.is_intact
    assert "This signed version changed after it was signed" in page(client, visit)
    one = client.get(reverse("visits:note_version", args=[visit.pk, 1]))
    assert "Changed after signing" in text_of(one)
    for asked in (1, None):
        response = fhir(client, visit, asked)
        assert response.status_code == 409
        assert response.json()["code"] == "note_tampered"
    refused = list(visit.access_events.filter(outcome=AccessEvent.Outcome.REFUSED))
    assert len(refused) == 2
    assert {(e.action, e.actor, e.note_version) for e in refused} == {
        (AccessEvent.Action.EXPORT_FHIR, clinician, 1),
        (AccessEvent.Action.EXPORT_FHIR, clinician, None),
    }
    assert all("changed after it was signed" in e.detail for e in refused)
    exported = visit.access_events.filter(action=AccessEvent.Action.EXPORT_FHIR)
    assert not exported.filter(outcome=AccessEvent.Outcome.ALLOWED).exists()


def test_a_signed_version_changed_in_the_database_is_not_printed_as_signed(
    client, clinician, visit
):
    client.force_login(clinician)
    sign(client, visit, 1)
    note = version(visit, 1).note
    tampered = note.model_copy(update={"patient_summary": [NoteItem(text="Stop all medicine.")]})
    NoteVersion.objects.filter(visit=visit, number=1).update(
        content=tampered.model_dump(mode="json")
    )

    response = client.get(reverse("visits:after_visit_summary", args=[visit.pk]))

    assert "Signed by dr_ada." not in text_of(response)
    assert not visit.access_events.filter(
        action=AccessEvent.Action.PRINT_SUMMARY, outcome=AccessEvent.Outcome.ALLOWED
    ).exists()


# --- 5. amendments ---------------------------------------------------------------------------


def test_changing_a_signed_version_needs_a_reason_and_makes_an_amendment(client, clinician, visit):
    client.force_login(clinician)
    sign(client, visit, 1)
    i, line = ibuprofen_line(visit)
    change = {"base": "1", f"subjective-{i}": with_food(line)}

    for reason in ("", "typo"):  # none, or too short to say anything
        refused = edit(client, visit, {**change, "reason": reason})
        assert refused.status_code == 400
        assert "Version 1 is signed: changing it is an amendment" in text_of(refused)
        assert [v.number for v in versions(visit)] == [1]

    saved = edit(client, visit, {**change, "reason": f"  {REASON}  "}, follow=True)

    assert "Saved as version 2. Sign it to file the amendment." in text_of(saved)
    amendment = version(visit, 2)
    assert (amendment.kind, amendment.reason, amendment.author) == (
        NoteVersion.Kind.AMENDMENT,
        REASON,
        clinician,
    )
    assert not amendment.is_signed
    assert statuses(visit) == ["signed", "draft"]
    assert "An amendment in progress. The chart holds version 1" in page(client, visit)

    sign(client, visit, 2)

    first, second = note_history(visit)
    assert [first.status, second.status] == ["superseded", "signed"]
    assert (first.amends, first.superseded_by) == (None, 2)
    assert (second.amends, second.superseded_by) == (1, None)
    assert second.version.reason == REASON and second.version.is_intact
    assert first.version.is_intact


def test_the_amendment_exports_as_amended_and_replaces_the_earlier_version(
    client, clinician, visit
):
    client.force_login(clinician)
    amend(client, visit)

    latest = fhir(client, visit)
    assert latest.status_code == 200
    composition, reference = resources(latest)
    assert composition["status"] == "amended"
    assert composition["identifier"]["value"] == f"visit-{visit.pk}-note-2"
    assert reference["status"] == "current"
    assert reference["relatesTo"] == [
        {
            "code": "replaces",
            "target": {
                "identifier": {"system": IDENTIFIER_SYSTEM, "value": f"visit-{visit.pk}-note-1"}
            },
        }
    ]

    earlier = fhir(client, visit, 1)
    assert earlier.status_code == 200
    composition, reference = resources(earlier)
    assert (composition["status"], reference["status"]) == ("final", "superseded")
    assert "relatesTo" not in reference

    one = client.get(reverse("visits:note_version", args=[visit.pk, 1]))
    assert one.status_code == 200
    text = text_of(one)
    assert 'data-note-status="superseded"' in text
    assert "superseded</strong> by version 2" in text
    assert "ibuprofen, 400" in text or " 400 " in text  # version 1 reads as it was signed


def test_signing_a_reruns_draft_after_a_signed_version_needs_a_reason(
    client, clinician, operator, visit
):
    client.force_login(clinician)
    sign(client, visit, 1)
    visit_rerun_from(visit=visit, stage="note", actor=operator, reason="try again", inline=True)
    assert statuses(visit) == ["signed", "draft"]
    assert re.search(r'<input id="sign-reason" name="reason"', page(client, visit))

    refused = sign(client, visit, 2)

    assert "An earlier version is signed, so signing this one amends the chart: say why." in (
        text_of(refused)
    )
    assert not version(visit, 2).is_signed

    sign(client, visit, 2, reason="re-ran the note after a transcript fix")

    second = version(visit, 2)
    assert second.is_signed and second.reason == "re-ran the note after a transcript fix"
    assert second.content_sha256 == second.seal()
    assert statuses(visit) == ["superseded", "signed"]
    assert note_history(visit)[1].amends == 1
    composition, _ = resources(fhir(client, visit))
    assert composition["status"] == "amended"


# --- 6. the difference between versions ------------------------------------------------------


def chart(**parts: list[str]) -> ChartNote:
    items = {
        key: [NoteItem(text=t, segment_ids=[0]) for t in lines] for key, lines in parts.items()
    }
    summary = items.pop("patient_summary", [])
    soap = {key: items.get(key, []) for key in ("subjective", "objective", "assessment", "plan")}
    return ChartNote(soap=ChartSOAP(**soap), patient_summary=summary)


def test_note_diff_marks_changed_added_and_removed_lines_word_by_word():
    older = chart(
        subjective=["Takes lisinopril 10 mg daily.", "No known allergies."],
        assessment=["Hypertension, controlled."],
        plan=["Follow up in two weeks."],
        patient_summary=["Keep taking your medicine."],
    )
    newer = chart(
        subjective=["Takes lisinopril 20 mg daily.", "No known allergies."],
        objective=["Blood pressure 150/95."],
        plan=["Follow up in three weeks.", "Walk every day."],
        patient_summary=["Keep taking your medicine."],
    )

    parts = note_diff(older, newer)

    assert [(p.title, p.changed) for p in parts] == [
        ("Subjective", True),
        ("Objective", True),
        ("Assessment", True),
        ("Plan", True),
        ("Patient summary", False),
    ]
    subjective, objective, assessment, plan, summary = (p.lines for p in parts)
    assert subjective == [
        LineDiff(
            "changed", [("=", "Takes lisinopril"), ("-", "10"), ("+", "20"), ("=", "mg daily.")]
        ),
        LineDiff("same", [("=", "No known allergies.")]),
    ]
    assert objective == [LineDiff("added", [("+", "Blood pressure 150/95.")])]
    assert assessment == [LineDiff("removed", [("-", "Hypertension, controlled.")])]
    assert plan == [
        LineDiff("changed", [("=", "Follow up in"), ("-", "two"), ("+", "three"), ("=", "weeks.")]),
        LineDiff("added", [("+", "Walk every day.")]),
    ]
    assert summary == [LineDiff("same", [("=", "Keep taking your medicine.")])]
    assert not any(p.changed for p in note_diff(newer, newer))


def test_the_visit_page_compares_two_versions(client, clinician, visit):
    client.force_login(clinician)
    i, line = ibuprofen_line(visit)
    edit(client, visit, {"base": "1", f"subjective-{i}": line.text.replace("400", "600")})
    assert "<del>" not in page(client, visit)

    text = page(client, visit, compare="1", to="2")

    assert "Version 1 → version 2" in text
    assert "<del>400</del> <ins>600</ins>" in text
    assert 'Objective <span class="muted">(unchanged)</span>' in text


# --- 7. the visit's history ------------------------------------------------------------------

ROW = re.compile(
    r"<tr><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td><td class=\"muted\">([^<]*)</td></tr>"
)


def test_the_history_page_lists_everything_newest_first(client, clinician, visit):
    client.force_login(clinician)
    engine = version(visit, 1).engine
    run = visit.current_run_id
    amend(client, visit)
    assert fhir(client, visit).status_code == 200
    summary = client.get(reverse("visits:after_visit_summary", args=[visit.pk]))
    assert summary.status_code == 200

    response = client.get(reverse("visits:history", args=[visit.pk]))

    assert response.status_code == 200
    rows = [(who, what, detail) for _, who, what, detail in ROW.findall(text_of(response))]
    expected = [
        ("dr_ada", "opened the after-visit summary to print (version 2)", ""),
        ("dr_ada", "exported the note as FHIR (version 2)", ""),
        ("dr_ada", "signed version 2, amending version 1", REASON),
        ("dr_ada", "wrote version 2 of the note (amendment)", REASON),
        ("dr_ada", "signed version 1", ""),
        (engine, "wrote version 1 of the note (model draft)", ""),
        ("pipeline", "started the pipeline", ""),
        ("dr_ada", "uploaded the recording", ""),
    ]
    assert [row for row in rows if row in expected] == expected
    assert ("pipeline", f"run {run} succeeded", "") in rows
    assert rows[-1] == expected[-1]
    assert len(rows) == len(expected) + 1  # and the run's end: nothing else happened


# --- 8. visit_status --json ------------------------------------------------------------------


def status_json(visit: Visit) -> dict:
    out = StringIO()
    call_command("visit_status", str(visit.pk), "--json", *AUDITED, stdout=out)
    return json.loads(out.getvalue())


def test_visit_status_json_carries_the_note_version_and_no_deliveries(client, clinician, visit):
    document = status_json(visit)
    assert (document["note_version"], document["note_status"]) == (1, "draft")
    assert document["note"] == version(visit, 1).content
    assert document["deliveries"] == []

    client.force_login(clinician)
    amend(client, visit)

    document = status_json(visit)
    assert (document["note_version"], document["note_status"]) == (2, "signed")
    assert document["note"] == version(visit, 2).content
    assert document["deliveries"] == []
    out = StringIO()
    call_command("visit_status", str(visit.pk), *AUDITED, stdout=out)
    assert "note: version 2, signed" in out.getvalue()


# --- 9. the migration from per-run signatures ------------------------------------------------

BEFORE = [("visits", "0004_visit_ehr_refs")]
AFTER = [("visits", "0005_note_versions")]


def old_note(text: str) -> dict:
    return {
        "soap": {
            "subjective": [{"text": text, "segment_ids": [0, 1]}],
            "objective": [],
            "assessment": [{"text": "Back strain.", "segment_ids": [2]}],
            "plan": [{"text": "Follow up in two weeks.", "segment_ids": [3]}],
        },
        "patient_summary": [{"text": "Rest your back.", "segment_ids": [3]}],
    }


def migrate_to(targets: list[tuple[str, str]]) -> MigrationExecutor:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor


def test_the_migration_turns_each_runs_note_into_a_version_and_keeps_signatures(clinician):
    try:
        executor = migrate_to(BEFORE)
        # The state of every app as it now is: visits at 0004, the others at their latest.
        others = [node for node in executor.loader.graph.leaf_nodes() if node[0] != "visits"]
        old = executor.loader.project_state([*others, *BEFORE]).apps
        OldVisit = old.get_model("visits", "Visit")
        Run = old.get_model("pipeline", "Run")
        Stage = old.get_model("pipeline", "Stage")
        NoteSignature = old.get_model("visits", "NoteSignature")
        visit = OldVisit.objects.create(
            clinician_id=clinician.pk,
            recording="recordings/old.mp3",
            recording_name="old.mp3",
            recording_bytes=100,
        )
        subject = f"visit:{visit.pk}"
        finished = timezone.now() - timedelta(days=2)
        first = Run.objects.create(workflow="visit", subject=subject, status="succeeded")
        summarize = Stage.objects.create(
            run=first, name="summarize", position=2, status="succeeded", output={}
        )
        Stage.objects.create(
            run=first,
            name="note",
            position=3,
            status="succeeded",
            finished_at=finished,
            output={"engine": "offline keyword engine", "note": old_note("Back pain.")},
        )
        second = Run.objects.create(
            workflow="visit", subject=subject, status="succeeded", forked_from=first
        )
        Stage.objects.create(
            run=second, name="summarize", position=2, status="succeeded", reused_from=summarize
        )
        Stage.objects.create(
            run=second,
            name="note",
            position=3,
            status="succeeded",
            finished_at=finished + timedelta(hours=1),
            output={"engine": "gpt-4o-mini", "note": old_note("Back pain for a week.")},
        )
        failed = Run.objects.create(
            workflow="visit", subject=subject, status="failed", forked_from=second
        )
        Stage.objects.create(
            run=failed,
            name="note",
            position=3,
            status="failed",
            failure_kind="permanent",
            error_message="refused",
        )
        OldVisit.objects.filter(pk=visit.pk).update(current_run=failed)
        signature = NoteSignature.objects.create(visit=visit, run=first, signed_by_id=clinician.pk)

        migrate_to(AFTER)

        visit = Visit.objects.only("id").get(pk=visit.pk)  # the columns 0005 knows
        one, two = versions(visit)
        assert [(v.number, v.kind, v.run_id, v.engine) for v in (one, two)] == [
            (1, "draft", first.pk, "offline keyword engine"),
            (2, "draft", second.pk, "gpt-4o-mini"),
        ]
        assert one.note == ChartNote.from_draft(
            PostVisitNote.model_validate(old_note("Back pain."))
        )
        assert (one.signed_by_id, one.signed_at) == (clinician.pk, signature.signed_at)
        assert one.content_sha256 == one.seal()  # sealed as the application seals
        assert one.is_intact
        assert (one.created_at, two.created_at) == (finished, finished + timedelta(hours=1))
        assert not two.is_signed and two.content_sha256 == ""
        assert statuses(visit) == ["signed", "draft"]
        assert "visits_notesignature" not in connection.introspection.table_names()
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())
