"""/metrics: the engine's history and present in Prometheus's format, read from its tables (so
every worker's attempts count), for the scraper only, with nothing of a visit in it."""

from __future__ import annotations

import re

import pytest
from django.db.models import Sum
from django.urls import reverse
from prometheus_client.parser import text_string_to_metric_families

from pipeline.core.models import LLMCall, Stage
from tests.conftest import SHORT_VISIT
from visits.schemas import TranscribeOutput
from visits.services import visit_create, visit_start
from visits.speech.transcription import transcript_load

# The pipeline runs inline, whose heartbeat needs committed rows.
pytestmark = pytest.mark.django_db(transaction=True)

URL = reverse("metrics")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_processed_visit_shows_in_the_metrics_and_nothing_it_said_does(
    client, clinician, llm_server, settings
):
    settings.LLM_DAILY_BUDGET_USD = 1.0
    done = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=done, inline=True)
    visit_create(clinician=clinician, recording=SHORT_VISIT)  # queued, not started

    response = client.get(URL)

    assert response.status_code == 200
    text = response.content.decode()
    found = samples(text)

    def value(name: str, **labels: str) -> float:
        return found[(name, tuple(sorted(labels.items())))]

    for stage in ("ingest", "transcribe", "summarize", "note"):
        assert (
            value(
                "pipeline_stage_attempts_total",
                workflow="visit",
                stage=stage,
                outcome="succeeded",
                error_code="",
            )
            == 1
        )
        assert value("pipeline_stage_duration_seconds_count", workflow="visit", stage=stage) == 1
        assert (
            value(
                "pipeline_stage_duration_seconds_bucket", workflow="visit", stage=stage, le="+Inf"
            )
            == 1
        )
    assert value("pipeline_audio_seconds_total", workflow="visit", stage="transcribe") == (
        pytest.approx(11.76, abs=0.2)
    )
    billed = LLMCall.objects.aggregate(i=Sum("input_tokens"), o=Sum("output_tokens"))
    tokens = {
        direction: sum(
            value(
                "pipeline_llm_tokens_total",
                workflow="visit",
                stage=stage,
                model="gpt-4o-mini",
                direction=direction,
            )
            for stage in ("summarize", "note")
        )
        for direction in ("input", "output")
    }
    assert tokens == {"input": billed["i"], "output": billed["o"]}
    # The queued visit's ingest waits on the default queue.
    assert value("pipeline_queue_ready_stages", queue="default") == 1
    assert value("pipeline_queue_oldest_ready_age_seconds", queue="default") >= 0
    assert value("pipeline_llm_daily_budget_usd") == 1.0
    assert 0 < value("pipeline_llm_daily_budget_left_usd") < 1.0
    # No word the patient or clinician said is in a label or a value (the help texts are
    # ours, and say "today").
    output = Stage.objects.get(run=done.current_run, name="transcribe").output
    transcript = transcript_load(TranscribeOutput.model_validate(output))
    said = " ".join(segment.text for segment in transcript.segments)
    words = set(re.findall(r"[a-z]{5,}", said.lower()))
    data = "\n".join(line for line in text.lower().splitlines() if not line.startswith("#"))
    assert words and not [w for w in words if w in data]


def test_only_the_scraper_may_read_them(client, settings):
    settings.METRICS_TOKEN = "s3cret-token"

    assert client.get(URL, REMOTE_ADDR="10.0.0.5").status_code == 403
    assert (
        client.get(URL, REMOTE_ADDR="10.0.0.5", HTTP_AUTHORIZATION="Bearer wrong").status_code
        == 403
    )
    assert (
        client.get(
            URL, REMOTE_ADDR="10.0.0.5", HTTP_AUTHORIZATION="Bearer s3cret-token"
        ).status_code
        == 200
    )
    assert client.get(URL, REMOTE_ADDR="127.0.0.1").status_code == 200  # the allow-list
