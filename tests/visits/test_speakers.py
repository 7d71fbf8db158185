"""Who says each segment: named by the model from the words where it can tell, "unknown"
where nobody can (always with the offline engine, which does not guess)."""

from __future__ import annotations

import json

import pytest
from django.urls import reverse

from tests.conftest import SHORT_VISIT
from tests.fakes.llm_server import default_content
from visits.selectors import visit_status_document
from visits.services import visit_create, visit_start

pytestmark = pytest.mark.django_db(transaction=True)


def labelled(turns: list[dict], repairs: list[str]):
    def respond(body: dict) -> str:
        if len(body["messages"]) > 2:
            repairs.append(body["messages"][-1]["content"])
        content = json.loads(default_content(body))
        if "speakers" in content:
            asked_to_repair = len(body["messages"]) > 2
            content["speakers"] = [t for t in turns if not asked_to_repair or t["segment_id"] < 99]
        return json.dumps(content)

    return respond


def processed(clinician):
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit, inline=True)
    visit.refresh_from_db()
    assert visit.current_run.status == "succeeded"
    return visit


def test_the_offline_engine_names_no_speaker(clinician):
    document = visit_status_document(processed(clinician))
    assert {segment.speaker for segment in document.transcript.segments} == {"unknown"}


def test_the_model_names_speakers_it_can_tell_and_a_made_up_segment_is_repaired(
    client, clinician, llm_server
):
    repairs: list[str] = []
    llm_server.responder = labelled(
        [
            {"segment_id": 0, "speaker": "clinician"},
            {"segment_id": 1, "speaker": "patient"},
            {"segment_id": 999, "speaker": "patient"},  # no such segment: asked to repair
        ],
        repairs,
    )
    visit = processed(clinician)

    (repair,) = repairs
    assert "[999]" in repair
    segments = visit_status_document(visit).transcript.segments
    assert [s.speaker for s in segments[:2]] == ["clinician", "patient"]
    assert {s.speaker for s in segments[2:]} <= {"unknown"}
    client.force_login(clinician)
    page = client.get(reverse("visits:detail", args=[visit.pk])).content.decode()
    assert 'data-speaker="clinician">Clinician:' in page and 'data-speaker="patient"' in page
    assert 'title="Speaker not known"' in page or len(segments) == 2
