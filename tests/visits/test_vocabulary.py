"""The words a visit's transcription is told to expect: the lexicon and the clinician's own."""

from __future__ import annotations

import json

import pytest
from django.urls import reverse

from tests.conftest import SHORT_VISIT
from visits.models import ClinicianVocabulary
from visits.services import visit_create
from visits.speech.vocabulary import LEXICON_PATH, PROMPT_MAX_CHARS, lexicon, vocabulary_prompt


def test_every_drug_of_the_lexicon_is_a_known_drug_and_the_file_says_where_it_comes_from():
    from visits.notes.claims import drugs_in

    data = json.loads(LEXICON_PATH.read_text())
    assert "Never from test recordings" in data["provenance"]
    drugs = {d for s in data["specialties"].values() for d in s["drugs"]} | set(
        data["common_drugs"]
    )
    assert len(drugs) >= 150  # distinct drug names
    assert sorted(d for d in drugs if not drugs_in(d)) == []


def test_the_prompt_puts_the_clinicians_words_first_then_drugs_and_fits_whisper():
    prompt = vocabulary_prompt("cardiology", ["Dr. Okafor", "Eliquis"])
    assert prompt.startswith(
        "A cardiology visit. Also: Dr. Okafor, Eliquis. Medications discussed:"
    )
    assert "metoprolol" in prompt and "Terms:" in prompt
    assert len(prompt) <= PROMPT_MAX_CHARS + 40


def test_a_long_list_is_cut_from_its_end_never_mid_word():
    words = [f"word{i:03d}" for i in range(500)]
    prompt = vocabulary_prompt("", words)
    kept = prompt.split("Also: ")[1].split(".")[0].split(", ")
    assert kept == words[: len(kept)] and 10 < len(kept) < 500


def test_an_unknown_specialty_gets_the_common_words_only():
    prompt = vocabulary_prompt("astrology", [])
    assert "penicillin" in prompt
    assert not any(d in prompt for d in lexicon()["specialties"]["cardiology"]["drugs"][:3])


@pytest.mark.django_db
def test_a_visit_keeps_the_prompt_of_its_clinician_at_creation(clinician):
    plain = visit_create(clinician=clinician, recording=SHORT_VISIT)
    assert plain.current_run.input["whisper_prompt"] == ""

    vocabulary = ClinicianVocabulary.objects.create(
        clinician=clinician, specialty="dermatology", words="Dr. Ngata\n\n  Dupixent \n"
    )
    assert vocabulary.word_list() == ["Dr. Ngata", "Dupixent"]
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    prompt = visit.current_run.input["whisper_prompt"]
    assert prompt == vocabulary_prompt("dermatology", ["Dr. Ngata", "Dupixent"])

    vocabulary.words = "something else"
    vocabulary.save()
    visit.current_run.refresh_from_db()
    assert visit.current_run.input["whisper_prompt"] == prompt  # the visit keeps its own


@pytest.mark.django_db
def test_the_admin_shows_the_prompt_a_clinicians_visits_will_get(admin_client, clinician):
    vocabulary = ClinicianVocabulary.objects.create(clinician=clinician, specialty="psychiatry")
    page = admin_client.get(
        reverse("admin:visits_clinicianvocabulary_change", args=[vocabulary.pk])
    ).content.decode()
    assert "A psychiatry visit. Medications discussed: sertraline" in page
