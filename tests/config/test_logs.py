"""JSON logs: every line an object naming what it is about, and no word of a visit in any."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
from django.urls import reverse

from config.logs import JsonFormatter
from tests.conftest import SHORT_VISIT
from visits.schemas import TranscribeOutput
from visits.services import visit_create, visit_start
from visits.speech.transcription import transcript_load

# The pipeline runs inline, whose heartbeat needs committed rows.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """What the root logger writes, as the production handler formats it."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield out
    root.removeHandler(handler)
    root.setLevel(level)


def test_every_line_is_json_naming_its_attempt_or_visit_and_none_holds_what_was_said(
    json_lines, client, clinician, other_clinician, llm_server
):
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit, inline=True)
    visit.refresh_from_db()
    client.force_login(other_clinician)
    assert client.get(reverse("visits:detail", args=[visit.pk])).status_code == 404

    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]

    done = [line for line in lines if "succeeded in" in line["event"]]
    assert {line["stage"] for line in done} == {"ingest", "transcribe", "summarize", "note"}
    for line in done:
        assert line["subject"] == f"visit:{visit.pk}"
        assert (line["run"], line["attempt"]) == (visit.current_run_id, 1)
        assert line["level"] == "info" and line["timestamp"].endswith("Z")
    # The model's HTTP calls happen inside the attempt: they name it too.
    calls = [line for line in lines if "chat/completions" in line["event"]]
    assert calls and {line["stage"] for line in calls} == {"summarize", "note"}
    (refused,) = [line for line in lines if line["logger"] == "django.request"]
    assert (refused["view"], refused["visit"], refused["level"]) == (
        "visits:detail",
        visit.pk,
        "warning",
    )

    transcribed = visit.current_run.stages.get(name="transcribe").output
    transcript = transcript_load(TranscribeOutput.model_validate(transcribed))
    words = set(re.findall(r"[a-z]{5,}", " ".join(s.text for s in transcript.segments).lower()))
    text = json_lines.getvalue().lower()
    assert words and not [word for word in words if re.search(rf"\b{word}\b", text)]
